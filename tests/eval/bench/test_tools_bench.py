"""The tool benchmark (latency and evidence quality) and the expert probes' released-score hook."""
from __future__ import annotations

import dataclasses
import json

import pytest

from anomalyclaw.cli import main
from anomalyclaw.eval.bench.tools import evaluate_tools, run_tool_benchmark
from anomalyclaw.tools import ItemContext, ToolRegistry


def test_latency_benchmark_reports_every_requested_tool(tmp_path):
    rows = run_tool_benchmark(size=96, repeats=3, tools=["region_zoom", "image_diff", "anomaly_vfm_score"],
                              data_dir=tmp_path)
    assert [r["tool"] for r in rows] == ["region_zoom", "image_diff", "anomaly_vfm_score"]
    for row in rows:
        assert row["ok"], row
        assert 0 < row["median_ms"] <= row["p95_ms"] and row["first_ms"] > 0 and row["repeats"] == 3
    assert [r["expert"] for r in rows] == [False, False, True]


def test_quality_evaluation_gives_auroc_and_localisation(small_synth):
    result = evaluate_tools(small_synth, tools=["image_diff", "blob_layout_viz"], domains=["S2"])
    stats = result["image_diff"]["S2"]
    assert stats["n"] == 2 and stats["auroc"] is not None and 0 <= stats["loc_top1"] <= 1
    assert set(result) == {"image_diff", "blob_layout_viz"}


def test_main_prints_a_table_and_writes_json(tmp_path, small_synth, capsys):
    out = tmp_path / "quality.json"
    assert main(["bench", "tools", "--manifest", str(small_synth), "--tools", "image_diff", "--domains", "S6",
                 "--out", str(out)]) == 0
    assert "image_diff" in capsys.readouterr().out
    assert json.loads(out.read_text())["image_diff"]["S6"]["n"] == 2


def test_probe_reports_the_released_score_when_the_ids_match(reference_dir, small_items):
    """A synthetic image given a released test id shows that id's cached score, and only the
    score fields: never the cached label or prediction."""
    from anomalyclaw.experts.released import ReleasedScoreCache

    cache = ReleasedScoreCache.load(reference_dir / "expert_cache")
    item_id = next(i for i in sorted(cache.ids("anomalyvfm")) if i.startswith("D1_"))
    row = cache.get(item_id, "anomalyvfm")
    base = small_items[0]
    item = dataclasses.replace(base, item_id=item_id, domain_code="D1", split=row["split"], card=None)
    obs = ToolRegistry.default().run("anomaly_vfm_score", {}, ItemContext(item, score_cache=cache))
    assert obs.ok and obs.data["released"]["score"] == pytest.approx(row["score"])
    assert set(obs.data["released"]) <= {"score", "score_norm", "threshold"}
    elsewhere = dataclasses.replace(item, domain_code="D2")
    other = ToolRegistry.default().run("anomaly_vfm_score", {}, ItemContext(elsewhere, score_cache=cache))
    assert "released" not in other.data
