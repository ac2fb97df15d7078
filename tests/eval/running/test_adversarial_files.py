"""The standing adversarial suite, files and signals (issue 16): a bad line in the middle of
records.jsonl then --resume and eval; a read-only run folder; a full disk (RLIMIT_FSIZE in a
subprocess); SIGTERM mid-run, then --resume. Each asserts what the user sees and that every
finished record survives."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomalyclaw.cli import main as cli_main
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file semantics")


def _cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "anomalyclaw", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if limit_bytes else None)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def six(small_items, tmp_path) -> tuple[Path, list[str]]:
    items = small_items[:6]
    return write_manifest(items, tmp_path / "manifest.json"), [it.item_id for it in items]


def test_a_bad_line_in_the_middle_is_redone_by_resume_and_named_by_eval(six, tmp_path, capsys):
    manifest, ids = six
    out = tmp_path / "run"
    run = ["run", "--manifest", str(manifest), "--out", str(out), "--no-progress", "--json"]
    assert cli_main(run) == 0
    records = out / RECORDS_FILE
    lines = records.read_text(encoding="utf-8").splitlines()
    spoiled = json.loads(lines[2])["item_id"]
    lines[2] = lines[2][: len(lines[2]) // 2]               # a line cut in the middle of the file
    records.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert cli_main(run + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "1 items judged" in printed and "5 already done" in printed         # only the spoiled one
    kept = [r for r in (_try(line) for line in records.read_text().splitlines()) if r]
    assert sorted(r["item_id"] for r in kept) == sorted(ids) and [r["item_id"] for r in kept][-1] == spoiled
    assert cli_main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kept"] == 6 and result["left_out"] == {"unreadable": 1}
    assert f"{RECORDS_FILE}:3" in result["unreadable_first"]


def _try(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _read_only(folder: Path) -> None:
    """Make ``folder`` refuse new files, also for root (which ignores permission bits)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only here")


def test_a_read_only_run_folder_is_refused_before_any_work(six, tmp_path):
    manifest, _ = six
    out = tmp_path / "readonly"
    _read_only(out)
    try:
        proc = _cli("run", "--manifest", str(manifest), "--out", str(out), "--no-progress")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True) if os.geteuid() == 0 else out.chmod(0o755)
    assert proc.returncode == 3 and str(out) in proc.stderr          # it says which folder, in one line
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "items judged" not in proc.stdout and list(out.iterdir()) == []


def test_a_full_disk_stops_the_run_keeping_every_finished_record(six, tmp_path):
    """Records of 2-6 KB each under a 20 KB file-size limit: the write that does not fit fails.
    The run stops saying what to do, the file ends with the last whole record (the torn write is
    cut back), and --resume with room again finishes the rest, each item once."""
    manifest, ids = six
    out = tmp_path / "run"
    args = ("run", "--manifest", str(manifest), "--out", str(out), "--no-progress", "--json")
    full = _cli(*args, limit_bytes=20_000)
    assert full.returncode == 3, full.stderr[-2000:]
    assert "cannot append" in full.stderr and "--resume" in full.stderr
    data = (out / RECORDS_FILE).read_bytes()
    assert data.endswith(b"\n") and len(data) <= 20_000
    done = [r["item_id"] for r in _lines(out / RECORDS_FILE)]               # every line whole
    assert 0 < len(done) < len(ids)
    again = _cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(r["item_id"] for r in _lines(out / RECORDS_FILE)) == sorted(ids)
    assert json.loads(again.stdout.strip().splitlines()[-1])["n_items"] == len(ids)


def test_sigterm_mid_run_keeps_every_record_and_resume_finishes(six, tmp_path):
    """What schedulers and `timeout` send: the records so far are kept, the summary is written,
    the exit status is 143; --resume then judges only what is missing, each item once."""
    import signal
    import time

    manifest, ids = six
    out = tmp_path / "run"
    args = ["run", "--manifest", str(manifest), "--out", str(out), "--no-progress", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "anomalyclaw", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    records = out / RECORDS_FILE
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (records.exists() and records.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "Traceback" not in stderr and "rerun with --resume" in stderr
    before = records.read_text(encoding="utf-8").splitlines()
    kept = [json.loads(line)["item_id"] for line in before]
    assert 1 <= len(kept) <= len(ids)
    (info,) = out.glob("run_*.json")
    assert json.loads(info.read_text())["summary"]["n_done"] == len(kept)
    again = _cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(r["item_id"] for r in _lines(records)) == sorted(ids)
    assert records.read_text(encoding="utf-8").splitlines()[: len(before)] == before  # finished records untouched
