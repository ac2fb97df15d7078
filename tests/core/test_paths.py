"""Safe file names for any text: an item id becomes one path component that cannot escape its
folder, hide as a dot file, or collide with another id's name."""
from __future__ import annotations

import pytest

from anomalyclaw.paths import SLUG_CHARS, safe_file_name

HOSTILE_IDS = ["a/b", "a_b", "a\\b", "x y", "x?y", "x" * 120 + "1", "x" * 120 + "2", "../../etc/passwd",
               "..", ".", "", ".hidden", "line\nbreak", "line break", "A", "a", "-rf", "é", "e",
               "z" * 10_000, "CON", "nul\x00byte", "\udcff"]


def test_safe_file_name_is_safe_and_distinct(tmp_path):
    names = [safe_file_name(i) for i in HOSTILE_IDS]
    assert len(set(names)) == len(HOSTILE_IDS)                 # distinct
    assert len({n.lower() for n in names}) == len(HOSTILE_IDS)  # even on a case-blind file system
    for n in names:
        assert "/" not in n and "\\" not in n and "\x00" not in n and "\n" not in n
        assert not n.startswith((".", "-")) and n not in (".", "..")
        assert 0 < len(n) <= SLUG_CHARS + 13
        (tmp_path / n).write_text("x")                          # a real file system takes every name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)   # and nothing landed elsewhere


def test_safe_file_name_is_stable_readable_and_suffixed():
    assert safe_file_name("coin_01") == safe_file_name("coin_01")
    assert safe_file_name("coin_01").startswith("coin_01-")
    assert safe_file_name("S2/coin 01", suffix=".png").startswith("S2_coin_01-")
    assert safe_file_name("obs1_zoom", suffix=".png").endswith(".png")
    assert safe_file_name("x", suffix=".tar.gz").endswith(".tar.gz")
    for bad in ("/../y", "png", ".p/ng", ".."):
        with pytest.raises(ValueError, match="suffix"):
            safe_file_name("x", suffix=bad)


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary_behind(tmp_path, monkeypatch):
    from anomalyclaw.paths import write_atomic

    target = tmp_path / "new" / "f.json"
    assert write_atomic(target, "é\n") == target and target.read_bytes() == "é\n".encode()
    write_atomic(target, b"\x00\x01", fsync=True)
    assert target.read_bytes() == b"\x00\x01"

    def no_rename(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("anomalyclaw.paths.os.replace", no_rename)
    with pytest.raises(OSError):
        write_atomic(target, b"half")
    assert target.read_bytes() == b"\x00\x01" and sorted(p.name for p in target.parent.iterdir()) == ["f.json"]
