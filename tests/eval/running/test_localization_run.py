"""Every record carries its localization: boxes, and map files with safe, distinct names; eval
scores the maps where masks exist; a threshold gives label_pred."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from anomalyclaw.cli import main
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE, load_records
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.localize import decode_map
from anomalyclaw.graph.vlm import make_vlm

HOSTILE_IDS = ["../../escape", "a/b", "a_b", "line\nbreak", "x" * 10_000, "x" * 9_999 + "y", ".hidden", "S2 coin?"]


@pytest.fixture(scope="module")
def hostile_manifest(small_items, tmp_path_factory) -> Path:
    """S2 and S6 items (aligned and bi-temporal, with masks) under hostile ids."""
    base = [it for it in small_items if it.domain_code in ("S2", "S6")]
    assert len(base) == 4
    items = [dataclasses.replace(base[k % len(base)], item_id=rid) for k, rid in enumerate(HOSTILE_IDS)]
    return write_manifest(items, tmp_path_factory.mktemp("hostile") / "manifest.json")


@pytest.fixture(scope="module")
def hostile_run(hostile_manifest, tmp_path_factory) -> Path:
    from anomalyclaw.eval.data.manifests import load_manifest

    out = tmp_path_factory.mktemp("hostile_run") / "run"
    summary = asyncio.run(Runner(make_vlm("offline"), out_dir=out, progress=False, threshold=0.5)
                          .run(load_manifest(hostile_manifest)))
    assert summary.n_done == len(HOSTILE_IDS) and summary.n_errors == 0
    return out


def test_every_record_localizes_with_safe_distinct_map_files(hostile_run):
    records = {r.item_id: r for r in load_records(hostile_run)}
    assert set(records) == set(HOSTILE_IDS)
    maps_root = (hostile_run / "maps").resolve()
    files = set()
    for rid, r in records.items():
        loc = r.localization
        assert loc is not None and loc["map_shape"] == [256, 256]
        for key in ("map", "expert_map"):
            path = (hostile_run / loc[key]).resolve()
            assert path.is_relative_to(maps_root) and path.is_file(), (rid, loc[key])
            assert not path.name.startswith(".") and len(path.name) < 100 and "\n" not in path.name
            amap = decode_map(path.read_bytes())
            assert amap.shape == (256, 256) and 0.0 <= amap.min() and amap.max() <= 1.0
            files.add(path)
        for box in loc["boxes"]:
            x0, y0, x1, y1 = box["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.0 <= box["score"] <= 1.0
        assert "map_png" not in loc and "expert_map_png" not in loc       # records stay JSON
        assert loc["map_bytes"] > 0 and loc["elapsed_s"] >= 0
        assert r.threshold == 0.5 and r.label_pred == int(r.anomaly_score >= 0.5)
    assert len(files) == 2 * len(HOSTILE_IDS)                              # distinct, none overwritten
    # Nothing was written outside OUT/maps (no "escape" file beside or above the run).
    assert not list(hostile_run.parent.glob("escape*")) and not list(hostile_run.glob("escape*"))
    assert {p.parent for p in files} == {maps_root, maps_root / "expert"}
    # The agent's map differs from the expert's where the agent found something.
    found = [r for r in records.values() if r.localization["boxes"] or r.localization["refuted"]]
    assert found
    r = found[0]
    agent = decode_map((hostile_run / r.localization["map"]).read_bytes())
    expert = decode_map((hostile_run / r.localization["expert_map"]).read_bytes())
    assert np.abs(agent - expert).max() > 0.05


def test_no_maps_keeps_the_boxes(small_items, tmp_path, monkeypatch):
    items = [it for it in small_items if it.domain_code == "S6"]
    out = tmp_path / "run"

    def never(*args, **kw):
        raise AssertionError("a run that keeps no maps encoded one")

    monkeypatch.setattr("anomalyclaw.graph.localize.encode_map", never)  # (a failure would leave no localization)
    asyncio.run(Runner(make_vlm("offline"), out_dir=out, progress=False, save_maps=False).run(items))
    records = load_records(out)
    assert not (out / "maps").exists()
    assert all(r.localization is not None and r.localization["map"] is None for r in records)
    assert any(r.localization["boxes"] or r.localization["refuted"] for r in records)
    assert all(r.label_pred is None for r in records)


def test_eval_scores_the_maps_against_masks(hostile_run, hostile_manifest, capsys):
    assert main(["eval", str(hostile_run), "--manifest", str(hostile_manifest), "--threshold", "0.5", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    pixel = result["pixel"]
    assert set(pixel) == {"agent", "expert", "box_hit_rate", "per_domain"}
    assert set(pixel["agent"]) == set(pixel["expert"]) == {"auroc", "aupro"}
    assert set(pixel["per_domain"]) == {"S2", "S6"}
    for d in pixel["per_domain"].values():
        assert d["n_items"] == 4 and 0.0 <= d["agent"]["auroc"] <= 1.0 and 0.0 <= d["expert"]["aupro"] <= 1.0
    assert 0.0 <= pixel["box_hit_rate"] <= 1.0
    assert result["decision"]["threshold"] == 0.5 and set(result["decision"]["macro"]) == {
        "f1", "precision", "recall", "accuracy"}
    assert "agent AUROC" in out and "image threshold 0.5000" in out


def test_items_without_masks_are_counted_not_scored(hostile_run, hostile_manifest, tmp_path, capsys):
    rows = json.loads(hostile_manifest.read_text())
    for row in rows:
        row.pop("mask_path", None)
        for key in ("query_path", "mask_path"):
            if row.get(key):
                row[key] = str((hostile_manifest.parent / row[key]).resolve())
        row["ref_paths"] = [str((hostile_manifest.parent / p).resolve()) for p in row["ref_paths"]]
    bare = tmp_path / "no_masks.json"
    bare.write_text(json.dumps(rows))
    assert main(["eval", str(hostile_run), "--manifest", str(bare), "--json"]) == 0
    out = capsys.readouterr().out
    assert "no record's item has a mask" in out and "pixel" not in json.loads(out.strip().splitlines()[-1])
    # Masks on some items only: the anomalous items without one are counted apart.
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.scoring.pixels import evaluate_pixels

    items = {it.item_id: it for it in load_manifest(hostile_manifest)}
    first_anomalous = next(i for i, it in items.items() if it.label == 1 and it.domain_code == "S2")
    items[first_anomalous] = dataclasses.replace(items[first_anomalous], mask_path=None)
    result = evaluate_pixels(load_records(hostile_run), items, hostile_run)
    assert result["per_domain"]["S2"]["no_mask"] == 1 and result["per_domain"]["S2"]["n_items"] == 3


def test_threshold_from_a_calibration_run(hostile_run, small_synth, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(small_synth), "--domains", "S6", "--out", str(out), "--no-progress",
                 "--no-maps", "--threshold-from", str(hostile_run), "--json"]) == 0
    printed = capsys.readouterr().out
    assert "image threshold from" in printed
    records = load_records(out / RECORDS_FILE)
    thresholds = {r.threshold for r in records}
    assert len(thresholds) == 1 and all(r.label_pred in (0, 1) for r in records)
    assert not (out / "maps").exists()


def test_draw_localization_paints_map_boxes_and_mask_outline(hostile_run, hostile_manifest):
    from anomalyclaw import draw_localization
    from anomalyclaw.eval.data.manifests import load_manifest

    items = {it.item_id: it for it in load_manifest(hostile_manifest)}
    records = load_records(hostile_run)
    r = next(r for r in records if r.label_gt == 1 and r.localization["boxes"] and items[r.item_id].mask_path)
    item = items[r.item_id]
    plain = draw_localization(r.model_copy(update={"localization": None, "direct_rationale": None}),
                              run_dir=hostile_run, query_path=item.query_path, side=256)
    drawn = draw_localization(r, run_dir=hostile_run, query_path=item.query_path, mask_path=item.mask_path, side=256)
    assert drawn.shape == plain.shape and drawn.dtype == np.uint8 and drawn.shape[2] == 3
    # The confirmed box's edge is red, where the plain query is not.
    x0, y0, x1, y1 = r.localization["boxes"][0]["bbox"]
    h, w = drawn.shape[:2]
    edge = drawn[round(y0 * h):round(y1 * h), round(x0 * w)]
    assert (edge[:, 0] > 200).mean() > 0.5 and (edge[:, 1] < 40).mean() > 0.5
    # Yellow outline pixels where the mask has an edge.
    yellow = (drawn[..., 0] > 230) & (drawn[..., 1] > 190) & (drawn[..., 2] < 60)
    assert yellow.sum() > 10 and not ((plain[..., 0] > 230) & (plain[..., 1] > 190) & (plain[..., 2] < 60)).all()
    # Without the query image it still draws the map on grey.
    assert draw_localization(r, run_dir=hostile_run).shape[2] == 3
    with pytest.raises(ValueError, match="not under"):
        draw_localization(r.model_copy(update={"localization": {**r.localization, "map": "../../etc/x.png"}}),
                          run_dir=hostile_run)
