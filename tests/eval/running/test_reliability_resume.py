"""A run SIGKILLed at any point resumes without losing, corrupting or duplicating a record."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomalyclaw.cli import main as cli_main
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE, Record, RecordWriter, RunFolderBusyError, RunLock
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _start(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out",
                             str(out), "--backend", "offline", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen, records: Path, n_lines: int, timeout_s: float = 120.0) -> bytes:
    """SIGKILL ``proc`` once ``records`` holds ``n_lines`` lines; the file's bytes at that moment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if records.exists() and records.read_bytes().count(b"\n") >= n_lines:
            break
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-2000:]}"
        time.sleep(0.02)
    else:
        proc.kill()
        raise AssertionError(f"no {n_lines} records within {timeout_s} s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return records.read_bytes()


def _complete_lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]  # whatever follows the last newline was torn by the kill


def test_sigkill_at_a_random_point_then_resume(small_items, tmp_path, capsys, caplog):
    items = small_items[:8]  # a start costs seconds of imports: one kill here, more in-process below
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    records = out / RECORDS_FILE
    kill_at = random.Random(7).randint(1, len(items) - 2)
    kept = _complete_lines(_kill_after(_start(manifest, out), records, kill_at))
    assert len(kept) >= kill_at
    with open(records, "ab") as fh:  # as if the kill had landed in the middle of a write
        fh.write(b'{"item_id": "' + items[-1].item_id.encode() + b'", "anomaly_sc')
    # The resume runs in this process (the same command line, without paying its imports again).
    with caplog.at_level(logging.WARNING):
        code = cli_main(["run", "--manifest", str(manifest), "--out", str(out), "--backend", "offline",
                         "--no-progress", "--resume", "--json"])
    assert code == 0
    final = records.read_bytes()
    assert final.endswith(b"\n") and _complete_lines(final)[: len(kept)] == kept  # nothing lost or rewritten
    ids = [Record.model_validate(json.loads(line)).item_id for line in _complete_lines(final)]
    assert sorted(ids) == sorted(it.item_id for it in items), f"killed after {kill_at}"  # each exactly once
    assert f"{len(kept)} already done" in capsys.readouterr().out
    assert "torn last line" in caplog.text


async def test_interrupt_at_random_points_then_resume(small_items, tmp_path):
    """Cancelling the run (what Ctrl-C does) at three points, resuming each time."""
    items = small_items[:8]
    records = tmp_path / RECORDS_FILE
    kept: list[bytes] = []
    for stop_after in sorted(random.Random(8).sample(range(1, len(items) - 1), 3)):
        runner = Runner(make_vlm("offline"), out_dir=tmp_path, progress=False, item_concurrency=2)
        task = asyncio.create_task(runner.run(items, resume=True))
        while not task.done() and (not records.exists() or records.read_bytes().count(b"\n") < stop_after):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lines = _complete_lines(records.read_bytes())
        assert lines[: len(kept)] == kept and len(lines) >= stop_after
        kept = lines
    summary = await Runner(make_vlm("offline"), out_dir=tmp_path, progress=False).run(items, resume=True)
    ids = [json.loads(line)["item_id"] for line in _complete_lines(records.read_bytes())]
    assert sorted(ids) == sorted(it.item_id for it in items)
    assert summary.n_skipped == len(kept) and summary.n_done == len(items) - len(kept)


def test_second_run_on_a_busy_folder_is_refused(small_items, tmp_path):
    with RunLock(tmp_path):
        runner = Runner(make_vlm("offline"), out_dir=tmp_path, progress=False)
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
            asyncio.run(runner.run(small_items[:1]))
    # The lock went with its holder: the folder is free again.
    with RunLock(tmp_path):
        pass


def test_records_file_in_use_without_resume_is_refused(small_items, tmp_path):
    with RecordWriter(tmp_path) as writer:
        writer.write(Record(item_id=small_items[0].item_id))
    with pytest.raises(AnomalyClawError, match="pass --resume"):
        asyncio.run(Runner(make_vlm("offline"), out_dir=tmp_path, progress=False).run(small_items[:1]))


async def test_a_records_file_that_cannot_be_written_stops_the_run(small_items, tmp_path, monkeypatch):
    original = RecordWriter.write
    calls = []

    def full_disk(self, record):
        calls.append(record.item_id)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        original(self, record)

    monkeypatch.setattr(RecordWriter, "write", full_disk)
    summary = await Runner(make_vlm("offline"), out_dir=tmp_path, progress=False,
                           item_concurrency=1).run(small_items[:4])
    assert summary.fatal and "No space left on device" in summary.fatal and "--resume" in summary.fatal
    assert len(calls) == 2 and summary.n_done == 1  # it stopped at the first failed write
    assert len(_complete_lines((tmp_path / RECORDS_FILE).read_bytes())) == 1


def test_demo_takes_the_lock_before_it_clears_records(tmp_path, capsys):
    """Issue 17 item 3: a second ``demo`` deleted a running demo's records, then was refused.
    Now it is refused first, and the running demo's records are untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = run_dir / RECORDS_FILE
    records.write_text(Record(item_id="finished").to_line() + "\n")
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "manifest.json").write_text("[]")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from anomalyclaw.eval.running.records import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    finally:
        holder.communicate("", timeout=30)
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert json.loads(records.read_text())["item_id"] == "finished"
