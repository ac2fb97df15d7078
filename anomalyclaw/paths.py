"""Paths: how a manifest writes a file's path so the folder (or the data) can move, and how any
text (an item id) becomes one safe file name."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

#: What a manifest path starts with when it lies under the data root (``ANOMALYCLAW_DATA``).
DATA_ROOT_PLACEHOLDER = "{DATA_ROOT}"


def portable_path(value: str | os.PathLike, *, base: str | os.PathLike | None = None,
                  data_root: str | os.PathLike | None = None) -> str:
    """``value`` as a manifest writes it: unchanged when it already starts with
    :data:`DATA_ROOT_PLACEHOLDER`; relative (POSIX) when it lies under ``base`` (the manifest's
    folder, so the folder moves as a whole); ``{DATA_ROOT}/...`` when under ``data_root``; else
    absolute."""
    text = str(value)
    if text.startswith(DATA_ROOT_PLACEHOLDER):
        return text
    path = Path(text).resolve()
    if base is not None:
        try:
            return path.relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    if data_root is not None:
        try:
            return f"{DATA_ROOT_PLACEHOLDER}/" + path.relative_to(Path(data_root).resolve()).as_posix()
        except ValueError:
            pass
    return text


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,16})*")
#: Characters of the readable part of a :func:`safe_file_name`.
SLUG_CHARS = 60
#: Hex digits of the hash part: 48 bits, so a collision among a million names has odds of about
#: 0.2 % (birthday bound n^2 / 2^49), and among ten thousand of about 2e-7.
HASH_CHARS = 12


def safe_file_name(text: str, *, suffix: str = "") -> str:
    """``text`` (an item id from a manifest, a tool image's name) as one file name that is safe
    and distinct: a readable slug (letters, digits, ``._-``; at most :data:`SLUG_CHARS`, no
    leading or trailing dot, dash or underscore) plus ``-`` and the first :data:`HASH_CHARS` hex
    digits of the SHA-256 of the whole text, then ``suffix`` (``".png"``).

    Safe: never a path separator, ``..``, a dot file, a control character, or a name longer than
    any file system allows (at most 73 characters plus the suffix). Distinct: two texts that
    differ anywhere (``a/b`` and ``a_b``, ``x y`` and ``x?y``, ids equal in their first hundred
    characters, ``A`` and ``a`` on a case-blind file system) get different names, since the hash
    is of the text itself, not of the slug. The same text always gets the same name.
    """
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"suffix {suffix!r} must be like '.png' (a dot, then letters or digits)")
    # surrogatepass: a manifest read with errors="surrogateescape" still hashes, never raises.
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    slug = _UNSAFE.sub("_", str(text))[:SLUG_CHARS].strip("._-")
    return (f"{slug}-{digest}" if slug else digest) + suffix


def writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and check that a file can be written in it (by writing and
    removing one); raise :class:`~anomalyclaw.errors.OutputError` naming the folder and the
    reason (a file in its place, read-only, no space) otherwise. Checked before the work starts,
    so no work is done that cannot be kept."""
    from .errors import OutputError

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the {what} {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".anomalyclaw-write-test-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"x")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to the {what} {folder}: {exc.strerror or exc}") from None
    return folder


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through a temporary file beside it
    and a rename, so a reader or a killed process never sees half a file; the folder is made
    when missing. ``fsync``: the data is on disk before the rename. Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
