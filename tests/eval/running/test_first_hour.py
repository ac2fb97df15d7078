"""A new user's first mistakes: each stops early with one line naming the cause and the
documented exit status, never a traceback, never exit 0 on a run that judged nothing (issue 15;
issue 17 cases 11 and 14)."""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anomalyclaw.cli import main
from anomalyclaw.errors import EXIT_ALL_ERRORS, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNAVAILABLE, EXIT_USAGE
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer


def _broken_items(small_items, tmp_path: Path, n: int = 3) -> list[dict]:
    """Manifest rows whose query files exist but are empty: each item errors, quickly."""
    rows = []
    for k, it in enumerate(small_items[:n]):
        empty = tmp_path / "empty" / f"q{k}.png"
        empty.parent.mkdir(parents=True, exist_ok=True)
        empty.write_bytes(b"")
        rows.append({**it.to_json(), "query_path": str(empty)})
    return rows


def _manifest(tmp_path: Path, rows: list[dict], name: str = "manifest.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _run(manifest: Path, out: Path, *extra: str) -> int:
    return main(["run", "--manifest", str(manifest), "--out", str(out), "--no-progress", *extra])


# ------------------------------------------------------------------------ the endpoint answers
def test_refused_connection_stops_before_the_first_item(small_items, tmp_path, capsys, free_port):
    manifest = write_manifest(small_items[:4], tmp_path / "m.json")
    url = f"http://127.0.0.1:{free_port}/v1"  # nothing listens there
    start = time.perf_counter()
    code = _run(manifest, tmp_path / "run", "--backend", "openai", "--base-url", url, "--model", "m")
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE and time.perf_counter() - start < 10
    assert f"the VLM endpoint {url} does not answer" in err and "Connection refused" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / RECORDS_FILE).exists()  # not one error record per item


def test_unknown_host_stops_with_the_url(small_items, tmp_path, capsys, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # a DNS failure, without asking a resolver
    manifest = write_manifest(small_items[:2], tmp_path / "m.json")
    code = _run(manifest, tmp_path / "run", "--backend", "openai", "--base-url", "http://vlm.example/v1",
                "--model", "m")
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE
    assert "the VLM endpoint http://vlm.example/v1 does not answer" in err and "Name or service not known" in err


def test_a_wrong_key_is_refused_by_the_preflight_naming_the_preset_variable(small_items, tmp_path, capsys,
                                                                             monkeypatch):
    manifest = write_manifest(small_items[:2], tmp_path / "m.json")
    with FakeVLMServer(api_key="sk-right") as server:
        monkeypatch.setenv("QWEN_API_BASE", server.base_url)
        monkeypatch.setenv("QWEN_MODEL", "fake-vlm")
        monkeypatch.setenv("QWEN_API_KEY", "sk-wrong")
        code = _run(manifest, tmp_path / "run", "--backend", "openai", "--preset", "qwen")
        completions = server.stats.completions
    err = capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE and completions == 0
    assert "HTTP 401" in err and "QWEN_API_KEY" in err and "sk-wrong" not in err


def test_preset_without_its_variables_names_them(small_items, tmp_path, capsys, monkeypatch):
    manifest = write_manifest(small_items[:1], tmp_path / "m.json")
    assert _run(manifest, tmp_path / "run", "--backend", "openai", "--preset", "qwen") == EXIT_USAGE
    assert "--preset qwen reads QWEN_API_BASE" in capsys.readouterr().err
    monkeypatch.setenv("QWEN_API_BASE", "http://127.0.0.1:9/v1")
    assert _run(manifest, tmp_path / "run", "--backend", "openai", "--preset", "qwen") == EXIT_USAGE
    assert "--preset qwen reads QWEN_MODEL" in capsys.readouterr().err


# ----------------------------------------------------------------------- the data is there
def test_missing_data_root_is_one_error(small_items, tmp_path, capsys, monkeypatch):
    rows = [{**it.to_json(), "query_path": "{DATA_ROOT}/q.png", "ref_paths": ["{DATA_ROOT}/r.png"]}
            for it in small_items[:3]]
    manifest = _manifest(tmp_path, rows)
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(tmp_path / "no_such_folder"))
    assert _run(manifest, tmp_path / "run") == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"ANOMALYCLAW_DATA={tmp_path / 'no_such_folder'} is a folder that does not exist" in err
    assert "3 items need it" in err and not (tmp_path / "run" / RECORDS_FILE).exists()


def test_first_items_files_missing_stops_before_any_request(small_items, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{**it.to_json(), "query_path": f"{{DATA_ROOT}}/{it.item_id}.png",
             "ref_paths": [f"{{DATA_ROOT}}/ref{k}.png" for k in range(2)]} for it in small_items[:6]]
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(data))  # exists, but holds nothing of the manifest
    assert _run(_manifest(tmp_path, rows), tmp_path / "run") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the images of the first 5 items" in err and str(data / f"{small_items[0].item_id}.png") in err
    assert f"ANOMALYCLAW_DATA is {data}" in err and not (tmp_path / "run" / RECORDS_FILE).exists()


def test_domains_match_in_any_case_and_unknown_ones_are_listed(small_synth, tmp_path, capsys):
    assert _run(small_synth, tmp_path / "a", "--domains", "s2,COIN_COUNT", "--json") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_items"] == 2 and set(out["per_domain"]) == {"S2"}
    assert _run(small_synth, tmp_path / "b", "--domains", "S2,S9,metal") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no items in domain(s) S9, metal in" in err and "S2 (coin_count, 2 items)" in err
    assert "S7 (rotating_nut, 2 items)" in err and not (tmp_path / "b").exists()


def test_split_that_matches_nothing_lists_the_splits(small_synth, tmp_path, capsys):
    assert _run(small_synth, tmp_path / "a", "--split", "dev") == EXIT_USAGE
    assert "has split dev; its splits: test (14 items)" in capsys.readouterr().err
    assert _run(small_synth, tmp_path / "b", "--split", "TEST", "--domains", "S6", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_items"] == 2


# --------------------------------------------------------------------- honest exit statuses
def test_a_run_where_every_item_errored_exits_4_with_the_reasons(small_items, tmp_path, capsys):
    manifest = _manifest(tmp_path, _broken_items(small_items, tmp_path))
    out = tmp_path / "run"
    assert _run(manifest, out) == EXIT_ALL_ERRORS
    err = capsys.readouterr().err
    assert "every item errored (3 of 3); the most common reasons:" in err
    assert "    3 x image: cannot load image" in err and "empty (0 bytes)" in err  # one reason, counted
    # The same again with --resume judges nothing new: still exit 4, and the way out is named.
    assert _run(manifest, out, "--resume") == EXIT_ALL_ERRORS
    err = capsys.readouterr().err
    assert "every item errored" in err and "add --retry-errors" in err


def test_a_run_where_some_items_errored_exits_0_and_says_why(small_items, tmp_path, capsys):
    rows = [it.to_json() for it in small_items[:2]] + _broken_items(small_items[2:], tmp_path, n=1)
    assert _run(_manifest(tmp_path, rows), tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "1 of 3 items errored; the most common reasons:" in err and "    1 x image: cannot load" in err


def test_an_empty_manifest_is_not_a_successful_run(tmp_path, capsys):
    assert _run(_manifest(tmp_path, []), tmp_path / "run") == EXIT_USAGE
    assert "holds no items to judge" in capsys.readouterr().err


# ------------------------------------------------------------------------ resume fingerprint
def test_resume_with_other_settings_is_refused_naming_the_fields(small_items, tmp_path, capsys):
    rows = _broken_items(small_items, tmp_path, n=2)
    manifest = _manifest(tmp_path, rows)
    out = tmp_path / "run"
    assert _run(manifest, out) == EXIT_ALL_ERRORS
    capsys.readouterr()
    assert _run(manifest, out, "--resume", "--max-turns", "2", "--alpha", "0.3") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds records made with other settings: max_turns 3 -> 2; alpha 0.5 -> 0.3" in err
    assert "--force" in err
    manifest.write_text(json.dumps(rows[:1]))  # the manifest changed since
    assert _run(manifest, out, "--resume") == EXIT_USAGE
    assert "manifest_sha256" in capsys.readouterr().err
    original = json.loads((out / "fingerprint.json").read_text())
    assert _run(manifest, out, "--resume", "--force") == EXIT_ALL_ERRORS  # accepted, and still all errors
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["manifest"] == str(manifest.resolve()) and fingerprint["version"]
    # The folder keeps its first records' fingerprint; the forced resume is noted, not adopted,
    # so resuming again with the changed manifest still needs --force.
    assert {k: v for k, v in fingerprint.items() if k != "forced_resumes"} == original
    (forced,) = fingerprint["forced_resumes"]
    assert any("manifest_sha256" in change for change in forced["changes"]) and forced["at"]
    capsys.readouterr()
    assert _run(manifest, out, "--resume") == EXIT_USAGE
    assert "manifest_sha256" in capsys.readouterr().err
    assert {"split", "domains", "backend", "model", "prompts", "tools", "max_turns", "alpha",
            "expert_weight"} <= set(fingerprint)


def test_run_file_keeps_the_command_line_version_and_libraries(small_items, tmp_path):
    import cv2
    import numpy

    from anomalyclaw import __version__

    manifest = _manifest(tmp_path, _broken_items(small_items, tmp_path, n=1))
    out = tmp_path / "run"
    main(["run", "--manifest", str(manifest), "--out", str(out), "--no-progress", "--max-turns", "2",
          "--backend", "offline"])
    (info_path,) = out.glob("run_*.json")
    info = json.loads(info_path.read_text())
    assert info["version"] == __version__
    libraries = info["libraries"]  # what can move the numbers, e.g. OpenCV's resize between 5.0 and 5.1
    assert libraries["numpy"] == numpy.__version__ and libraries["python"] == platform.python_version()
    opencv = [libraries[d] for d in ("opencv-python-headless", "opencv-python") if d in libraries]
    assert any(v.startswith(cv2.__version__) for v in opencv)  # "5.1.0.95" for cv2's "5.1.0"
    assert info["command"] == ["anomalyclaw", "run", "--manifest", str(manifest), "--out", str(out),
                               "--no-progress", "--max-turns", "2", "--backend", "offline"]


# --------------------------------------------------------- what cannot be written (issue 17.11)
def test_disk_full_ends_in_one_line_and_exit_3(small_items, tmp_path, capsys):
    """A records file on a full disk: the write fails, and so does the flush when the writer
    closes; neither may end in a traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    manifest = write_manifest(small_items[:2], tmp_path / "m.json")
    out = tmp_path / "run"
    out.mkdir()
    (out / RECORDS_FILE).symlink_to("/dev/full")  # every write to it fails with ENOSPC
    assert _run(manifest, out) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot append to {out / RECORDS_FILE}" in err and "No space left on device" in err
    assert "rerun with --resume" in err


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write to (root ignores chmod; /sys refuses root too)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        with open(folder / ".anomalyclaw-probe", "wb"):
            pass
    except OSError:
        return folder
    (folder / ".anomalyclaw-probe").unlink()
    pytest.skip("no read-only folder to test with")


@pytest.mark.parametrize("where", ["file", "read_only", "lock_folder"])
def test_an_out_folder_that_cannot_be_written_is_one_line(small_items, tmp_path, capsys, where):
    manifest = write_manifest(small_items[:1], tmp_path / "m.json")
    if where == "file":
        out = tmp_path / "a_file"
        out.write_text("not a folder")
        expected = f"the run folder {out} is a file, not a folder"
    elif where == "read_only":
        out = _read_only_folder(tmp_path)
        expected = f"cannot write to the run folder {out}"
    else:
        out = tmp_path / "run"
        (out / ".run.lock").mkdir(parents=True)
        expected = f"{out / '.run.lock'} is a folder, where the run's lock file belongs"
    assert _run(manifest, out) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("where", ["file", "read_only"])
def test_plots_and_report_folders_that_cannot_be_written(small_items, tmp_path, capsys, where):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"item_id": "a", "domain_code": "S1", "label_gt": 1, "direct_score": 0.9,
                                   "refute_score": 0.8}) + "\n")
    if where == "file":
        target = tmp_path / "a_file"
        target.write_text("x")
    else:
        target = _read_only_folder(tmp_path)
    assert main(["eval", str(records), "--plots", str(target / "plots" if where == "read_only" else target)]) \
        == EXIT_UNAVAILABLE
    assert "--plots folder" in capsys.readouterr().err
    assert main(["report", str(records), "--out", str(target / "report.html")]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "report folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------- signals (issue 17.14, issue 15)
def _when_started(out: Path, action, timeout_s: float = 120.0) -> threading.Thread:
    """Call ``action`` once the run has written its run file (it is judging items then)."""
    def wait() -> None:
        deadline = time.monotonic() + timeout_s
        while not list(out.glob("run_*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _check_stopped_run(out: Path, name: str, n_items: int) -> None:
    (info_path,) = out.glob("run_*.json")
    summary = json.loads(info_path.read_text())["summary"]  # the summary was written
    assert summary["interrupted"] == name
    lines = (out / RECORDS_FILE).read_text().splitlines() if (out / RECORDS_FILE).exists() else []
    assert summary["n_done"] == len(lines) < n_items and all(json.loads(line)["item_id"] for line in lines)


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigterm_stops_the_run_with_its_summary_and_exit_143(small_items, tmp_path):
    """What a scheduler or `timeout` sends, to a real process."""
    manifest = write_manifest(small_items[:8], tmp_path / "m.json")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out",
                             str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _when_started(out, proc.terminate)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_TERMINATED, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted (SIGTERM)" in stderr and "rerun with --resume" in stderr
    assert "items judged in" in stdout
    _check_stopped_run(out, "SIGTERM", 8)


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_ctrl_c_stops_the_run_and_says_rerun_with_resume(small_items, tmp_path, capsys):
    manifest = write_manifest(small_items[:8], tmp_path / "m.json")
    out = tmp_path / "run"
    late = []
    outer = signal.signal(signal.SIGINT, lambda *a: late.append(a))  # a signal after the run must not hit pytest
    try:
        _when_started(out, lambda: os.kill(os.getpid(), signal.SIGINT))
        code = _run(manifest, out)
    finally:
        time.sleep(0.3)
        signal.signal(signal.SIGINT, outer)
    assert not late, "the run ended before Ctrl-C: make it longer"
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED
    assert "interrupted (SIGINT)" in err and "rerun with --resume" in err
    _check_stopped_run(out, "SIGINT", 8)
    # Ctrl-C outside a run's event loop (here: while the manifest is read) says the same.
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from anomalyclaw.eval.data import manifests
    original = manifests.read_manifest
    manifests.read_manifest = interrupt
    try:
        assert _run(manifest, out, "--resume") == EXIT_INTERRUPTED
    finally:
        manifests.read_manifest = original
    assert f"interrupted; finished items are kept in {out}: rerun with --resume" in capsys.readouterr().err


def test_endpoint_flags_choose_the_openai_backend_and_are_refused_beside_offline(small_items, tmp_path, capsys,
                                                                                free_port):
    manifest = write_manifest(small_items[:2], tmp_path / "m.json")
    url = f"http://127.0.0.1:{free_port}/v1"  # nothing listens: the preflight must be what answers
    assert _run(manifest, tmp_path / "a", "--base-url", url, "--model", "m") == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert url in err and not (tmp_path / "a" / RECORDS_FILE).exists()  # asked the endpoint, not offline
    assert _run(manifest, tmp_path / "b", "--backend", "offline", "--preset", "qwen") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--preset names an endpoint, which --backend offline does not use" in err
    assert not (tmp_path / "b").exists()


def test_an_unknown_split_blames_the_flag_not_the_manifest(small_items, tmp_path, capsys):
    manifest = write_manifest(small_items[:2], tmp_path / "m.json")
    assert _run(manifest, tmp_path / "run", "--split", "foo") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no split named 'foo': a split is one of calibration, dev, test" in err and "invalid manifest" not in err
