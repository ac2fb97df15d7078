"""The command line's own contract: --version, numeric flags checked at parse time with their
range, one-line errors, -v showing this project's log lines, and one exit-status table that the
README and the module say alike (issue 15)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from anomalyclaw import __version__
from anomalyclaw.cli import main
from anomalyclaw.errors import (EXIT_ALL_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_CHECK_FAILED,
                                EXIT_UNAVAILABLE, EXIT_USAGE)

REPO = Path(__file__).resolve().parents[2]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"anomalyclaw {__version__}"


@pytest.mark.parametrize("argv, message", [
    (["run", "--manifest", "m", "--out", "o", "--limit", "0"], "argument --limit: expected a whole number >= 1, got '0'"),
    (["run", "--manifest", "m", "--out", "o", "--concurrency", "0"], "argument --concurrency: expected a whole number >= 1"),
    (["run", "--manifest", "m", "--out", "o", "--concurrency", "many"], "--concurrency: expected a whole number >= 1, got 'many'"),
    (["run", "--manifest", "m", "--out", "o", "--max-turns", "0"], "argument --max-turns: expected a whole number >= 1"),
    (["run", "--manifest", "m", "--out", "o", "--alpha", "1.5"], "argument --alpha: expected a number >= 0 and <= 1, got '1.5'"),
    (["run", "--manifest", "m", "--out", "o", "--alpha", "nan"], "argument --alpha: expected a number >= 0 and <= 1"),
    (["run", "--manifest", "m", "--out", "o", "--timeout", "0"], "argument --timeout: expected a number > 0"),
    (["run", "--manifest", "m", "--out", "o", "--expert-weight", "-0.1"], "--expert-weight: expected a number >= 0, got"),
    (["eval", "x", "--alpha", "-0.1"], "argument --alpha: expected a number >= 0 and <= 1, got '-0.1'"),
    (["eval", "x", "--bootstrap", "-5"], "argument --bootstrap: expected a whole number >= 0, got '-5'"),
    (["demo", "--concurrency", "-1"], "argument --concurrency: expected a whole number >= 1"),
    (["import-folder", "r", "--out", "o", "--n-refs", "0"], "argument --n-refs: expected a whole number >= 1"),
    (["synth", "--out", "o", "--size", "32"], "argument --size: expected a whole number >= 64 and <= 1024"),
])
def test_numeric_flags_are_checked_at_parse_time(argv, message, capsys):
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_eval_on_a_file_that_is_not_json_names_it(tmp_path, capsys):
    path = tmp_path / "scores.csv"
    path.write_text("item,score\na,0.5\n")
    assert main(["eval", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{path}: not valid JSON" in err and f"{path}: no readable records" in err and "Traceback" not in err


def test_tools_run_where_the_tool_does_not_apply_exits_non_zero(small_synth, capsys):
    # rotate_align is for rigid objects; S1 is a texture.
    code = main(["tools", "run", "rotate_align", "--manifest", str(small_synth), "--item", "S1_0000"])
    assert code == EXIT_CHECK_FAILED != EXIT_OK
    assert "rotate_align does not apply to this item" in capsys.readouterr().out


def test_verbose_shows_this_projects_tool_calls_not_only_library_noise(small_synth, tmp_path, caplog):
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING  # what a shell's run starts from
    assert main(["-v", "run", "--manifest", str(small_synth), "--domains", "S2", "--limit", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    ours = [r for r in caplog.records if r.name.startswith("anomalyclaw") and r.levelno == logging.INFO]
    assert any(re.search(r"item S2_0000: tool \w+ .* -> (evidence|no evidence|failed)", r.getMessage()) for r in ours)
    # -v leaves the HTTP and graph libraries at WARNING.
    assert not [r for r in caplog.records if not r.name.startswith("anomalyclaw") and r.levelno < logging.WARNING]


def test_verbose_levels():
    from anomalyclaw.cli import _log_levels

    assert _log_levels(0) == (logging.WARNING, logging.WARNING)
    assert _log_levels(1) == (logging.INFO, logging.WARNING)
    assert _log_levels(2) == (logging.DEBUG, logging.INFO)
    assert _log_levels(3) == (logging.DEBUG, logging.DEBUG)


def test_one_exit_status_table_everywhere():
    statuses = {EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_ALL_ERRORS, EXIT_INTERRUPTED,
                EXIT_TERMINATED}
    assert statuses == {0, 1, 2, 3, 4, 130, 143}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    rows = {int(m.group(1)) for m in re.finditer(r"^\| `?(\d+)`? \|", table, flags=re.M)}
    assert rows == statuses
    import anomalyclaw.cli as cli

    documented = {int(m.group(1)) for m in re.finditer(r"^(\d+)\s", cli.__doc__, flags=re.M)}
    assert statuses - {EXIT_TERMINATED} <= documented and "143" in cli.__doc__


def test_json_flag_still_ends_with_one_object(small_synth, tmp_path, capsys):
    assert main(["run", "--manifest", str(small_synth), "--domains", "S5", "--out", str(tmp_path / "r"),
                 "--no-progress", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["exit_status"] == 0 and last["top_errors"] == [] and last["per_domain"]["S5"]["name"]


def test_demo_and_predict_output_folders_are_ignored_by_git():
    from anomalyclaw.cli import build_parser

    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    parser = build_parser()
    for command in ("demo", "predict"):
        default = parser.parse_args([command] + (["q.png", "--refs", "r"] if command == "predict" else [])).out
        assert f"/{default}/" in ignored, default


def test_run_loop_flag_chooses_the_loop_and_a_bad_environment_value_stops_before_any_work(small_synth, tmp_path,
                                                                                          capsys, monkeypatch):
    pytest.importorskip("uvloop")
    manifest = str(small_synth)
    out = tmp_path / "run"
    assert main(["run", "--manifest", manifest, "--split", "test", "--limit", "2", "--out", str(out),
                 "--no-progress", "--loop", "asyncio"]) == EXIT_OK
    assert json.loads(next(out.glob("run_*.json")).read_text())["event_loop"] == "asyncio"
    monkeypatch.setenv("ANOMALYCLAW_LOOP", "fast")
    bad = tmp_path / "bad"
    assert main(["run", "--manifest", manifest, "--split", "test", "--out", str(bad), "--no-progress"]) == EXIT_USAGE
    assert "unknown event loop 'fast' (ANOMALYCLAW_LOOP): choose one of auto, uvloop, asyncio" in capsys.readouterr().err
    assert not bad.exists()
