"""Running the multiple-choice task: one record per question, shared per-image work, error
records for what cannot be asked, resume, and the command line from synth to eval."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from anomalyclaw.cli import main as cli_main
from anomalyclaw.eval.data.mmad import read_mmad
from anomalyclaw.eval.running.mcqa import McqRunner
from anomalyclaw.eval.running.records import RECORDS_FILE, load_records
from anomalyclaw.eval.running.runner import run_sync
from anomalyclaw.experts.pool import ExpertPool
from anomalyclaw.graph.vlm import make_vlm


@pytest.fixture
def mmad_with_problems(small_mmad, tmp_path) -> Path:
    """The small file plus a question with no valid answer and an image that is not there."""
    data = json.loads(small_mmad.read_text())
    first = next(iter(data))
    data[first]["conversation"].append({"Question": "Which?", "Options": {"A": "x", "B": "y"}, "Answer": "Q",
                                        "type": "Defect Description"})
    ghost = first.replace(".png", "_ghost.png")
    data[ghost] = json.loads(json.dumps(data[first]))
    path = small_mmad.parent / "mmad_problems.json"
    path.write_text(json.dumps(data))
    return path


def _run(contents, out, **kw):
    runner = McqRunner(make_vlm("offline"), out_dir=out, progress=False, expert_pool=ExpertPool("classic"))
    return runner, run_sync(runner, contents.images, rejected=contents.rejected, **kw)


def test_one_record_per_question_and_error_records(mmad_with_problems, tmp_path, monkeypatch):
    contents = read_mmad(mmad_with_problems)
    prepared = []
    original = McqRunner._prepare
    monkeypatch.setattr(McqRunner, "_prepare", lambda self, item: prepared.append(item.item_id) or original(self, item))
    runner, summary = _run(contents, tmp_path / "run")
    records = load_records(tmp_path / "run" / RECORDS_FILE)
    n_rejected = len(contents.rejected)
    first = next(iter(json.loads(mmad_with_problems.read_text()).values()))
    assert n_rejected == 1 + len(first["conversation"])  # the bad question, and every question of the ghost
    assert len(records) == contents.n_questions + n_rejected == summary.n_done + summary.n_rejected
    assert all(r.mode == "mcqa" for r in records)
    assert sorted(prepared) == sorted(im.item.item_id for im in contents.images)  # once per image
    ok = [r for r in records if not r.error]
    assert len(ok) == contents.n_questions and summary.n_errors == n_rejected
    for r in ok:
        x = r.model_extra
        assert set(x["mcq_answer"]) == {"direct", "refute"} and x["mcq_answer"]["direct"] in x["options"]
        assert x["question_id"] == r.item_id and x["image"] in r.item_id and x["answer"] in x["options"]
        assert r.usage["requests"] >= 2 and r.backend == "offline"
    errors = {r.item_id: r for r in records if r.error}
    ghost = [r for r in errors.values() if "_ghost" in r.item_id]
    assert ghost and all("query image not found" in r.error for r in ghost)
    assert all(r.model_extra["answer"] for r in ghost)  # still scorable: counted as unparsed
    bad = next(r for r in errors.values() if "_ghost" not in r.item_id)
    assert "'Answer' must be one of the option letters" in bad.error
    # the expert was fitted once per reference set, not once per question
    assert runner.expert_pool.stats["sets"] <= len(contents.images) < contents.n_questions
    info = json.loads(next((tmp_path / "run").glob("run_*.json")).read_text())
    assert info["task"] == "mcqa" and info["mmad"] == {} and info["summary"]["n_done"] == summary.n_done


def test_resume_asks_each_question_once(small_mmad, tmp_path):
    contents = read_mmad(small_mmad)
    out = tmp_path / "run"
    _run(contents.limited(5), out)
    _, summary = _run(contents, out, resume=True)
    ids = [json.loads(line)["item_id"] for line in (out / RECORDS_FILE).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == contents.n_questions
    assert summary.n_skipped == 5 and summary.n_done == contents.n_questions - 5
    with pytest.raises(Exception, match="--resume"):
        _run(contents, out)


def test_command_line_from_synth_to_eval(tmp_path, capsys):
    data = tmp_path / "D"
    assert cli_main(["synth", "--out", str(data), "--mmad", "--n-test", "2", "--n-calibration", "0", "--n-dev", "0",
                     "--size", "96", "--domains", "S2,S6"]) == 0
    assert "MMAD-format questions" in capsys.readouterr().out
    run = tmp_path / "R"
    assert cli_main(["run", "--task", "mcqa", "--manifest", str(data / "mmad.json"), "--backend", "offline",
                     "--out", str(run), "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert "stand-in" in printed and summary["task"] == "mcqa" and summary["requests_per_question"] >= 2
    assert cli_main(["eval", str(run), "--json", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])["mcqa"]
    assert {"n", "accuracy", "per_type", "per_dataset", "unparsed"} <= set(result)
    assert set(result["accuracy"]) >= {"direct", "refute"} and result["n"] == summary["n_questions"]
    assert set(result["per_type"]) == {"Anomaly Detection", "Defect Classification", "Defect Localization",
                                       "Object Analysis"}
    assert all({"direct", "refute", "n"} <= set(v) for v in result["per_type"].values())
    assert set(result["per_dataset"]) == {"S2_coin_count", "S6_aerial_change"}
    assert result["bootstrap"]["a"] == "refute" and "refute - direct" in printed
    for line in ("Anomaly Detection", "Object Analysis", "MMAD average"):
        assert line in printed
    # score records in the same folder are evaluated separately
    score = tmp_path / "S"
    assert cli_main(["run", "--manifest", str(data), "--split", "test", "--backend", "offline", "--out", str(score),
                     "--no-progress"]) == 0
    shutil.copy(score / RECORDS_FILE, run / "score_run.jsonl")
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--json", "--merge"]) == 0  # a folder of two runs needs --merge
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert both["kept"] == 4 and both["left_out"] == {"mode 'mcqa'": result["n"]} and both["mcqa"]["n"] == result["n"]
    assert cli_main(["run", "--task", "mcqa", "--manifest", str(data), "--split", "test", "--out",
                     str(tmp_path / "X")]) == 2
    assert "--split does not apply" in capsys.readouterr().err


def test_a_stop_mid_run_keeps_every_record_counted_and_resume_finishes(small_mmad, tmp_path):
    contents = read_mmad(small_mmad)
    out = tmp_path / "run"
    runner = McqRunner(make_vlm("offline"), out_dir=out, progress=False, expert_pool=ExpertPool("classic"),
                       item_concurrency=1)
    original = runner.ask

    async def ask_then_stop(*args, **kw):
        record = await original(*args, **kw)
        runner.request_stop("SIGTERM")  # lands while this question's record is still to be written
        return record

    runner.ask = ask_then_stop
    summary = run_sync(runner, contents.images)
    lines = (out / RECORDS_FILE).read_text().splitlines()
    assert summary.interrupted == "SIGTERM" and summary.n_done == len(lines) == 1
    assert summary.n_abandoned == len(contents.images[0].questions) - 1
    info = json.loads(next(out.glob("run_*.json")).read_text())
    assert info["summary"]["interrupted"] == "SIGTERM" and info["summary"]["n_done"] == 1
    _, resumed = _run(contents, out, resume=True)
    ids = [json.loads(line)["item_id"] for line in (out / RECORDS_FILE).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == contents.n_questions and resumed.n_skipped == 1


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigterm_on_the_command_line_writes_the_summary_and_exits_143(small_mmad, tmp_path, monkeypatch, capsys):
    original = McqRunner.ask

    async def slow_ask(self, *args, **kw):
        await asyncio.sleep(0.2)  # long enough a run that the signal lands mid-way
        return await original(self, *args, **kw)

    monkeypatch.setattr(McqRunner, "ask", slow_ask)
    out = tmp_path / "run"
    late = []
    outer = signal.signal(signal.SIGTERM, lambda *a: late.append(a))  # a signal after the run must not hit pytest

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 60
        while not (out / RECORDS_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    try:
        code = cli_main(["run", "--task", "mcqa", "--manifest", str(small_mmad), "--backend", "offline",
                         "--out", str(out), "--no-progress"])
    finally:
        time.sleep(0.3)
        signal.signal(signal.SIGTERM, outer)
    assert not late, "the run ended before SIGTERM: make it longer"
    assert code == 143 and "interrupted (SIGTERM)" in capsys.readouterr().err
    summary = json.loads(next(out.glob("run_*.json")).read_text())["summary"]
    lines = (out / RECORDS_FILE).read_text().splitlines()
    assert summary["interrupted"] == "SIGTERM" and summary["n_done"] == len(lines) < read_mmad(small_mmad).n_questions
