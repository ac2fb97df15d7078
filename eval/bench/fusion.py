"""Fused with and without the expert term, per domain: ``anomalyclaw bench fusion``.

Runs the full pipeline on the offline backend over two benchmarks, the synthetic one
(``anomalyclaw synth``) and a small MVTec-style folder drawn from images the synthetic one does
not use (:mod:`anomalyclaw.eval.data.parts`, imported with ``import-folder``), then scores each
run's records twice: with the expert term at the run's weight and without it (weight 0, the
paper's two-branch blend). The branches do not depend on the weight, so the records of one run
give both, exactly as two runs with ``--expert-weight`` 0.2 and 0 would.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from anomalyclaw.config import AgentConfig
from anomalyclaw.experts.pool import FUSION_EXPERTS
from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT, logistic

from anomalyclaw.eval.data.folders import import_mvtec_folder
from anomalyclaw.eval.data.manifests import read_manifest
from anomalyclaw.eval.data.parts import write_parts_folder
from anomalyclaw.eval.running.records import RECORDS_FILE, read_records
from anomalyclaw.eval.scoring.metrics import evaluate


def _compare(records: list, weight: float, alpha: float) -> dict[str, Any]:
    """Per-domain and macro AUROC of the blend (no expert term), the expert term alone, the
    fusion, their difference, and the fusion with each expert of the ensemble alone (from the
    records' ``expert_z``)."""
    with_expert = evaluate(records, alpha=alpha, expert_weight=weight)
    singles = {name: evaluate(records, alpha=alpha, expert_weight=weight, columns=("fused",),
                              expert={r.item_id: logistic(r.expert_z[name]) for r in records if name in r.expert_z})
               for name in FUSION_EXPERTS}
    out: dict[str, Any] = {"kept": with_expert["kept"], "per_domain": {}, "macro": {}}
    for code, d in with_expert["per_domain"].items():
        out["per_domain"][code] = {"n": d["n"], "blend": d["blend"], "expert": d.get("expert"), "fused": d["fused"],
                                   "delta": d["fused"] - d["blend"],
                                   **{f"fused_{name}": s["per_domain"][code]["fused"] for name, s in singles.items()}}
    m = with_expert["macro_auroc"]
    out["macro"] = {"blend": m["blend"], "expert": m.get("expert"), "fused": m["fused"], "delta": m["fused"] - m["blend"],
                    **{f"fused_{name}": s["macro_auroc"]["fused"] for name, s in singles.items()}}
    return out


def _run(manifest: Path, out_dir: Path, config: AgentConfig, split: str | None) -> tuple[list, float]:
    from anomalyclaw.eval.running.runner import Runner, run_sync
    from anomalyclaw.graph.vlm import make_vlm

    contents = read_manifest(manifest, split=split)
    (out_dir / RECORDS_FILE).unlink(missing_ok=True)  # each benchmark run starts fresh
    started = time.perf_counter()
    runner = Runner(make_vlm("offline"), out_dir=out_dir, config=config, progress=False, source=str(manifest))
    run_sync(runner, contents.items, rejected=contents.rejected)
    return read_records(out_dir / RECORDS_FILE).records, time.perf_counter() - started


def run_fusion_benchmark(out_dir: str | Path, *, seed: int = 0, synth_manifest: str | Path | None = None,
                         weight: float = DEFAULT_EXPERT_WEIGHT, n_test: int = 24,
                         only: str | None = None) -> dict[str, Any]:
    """Both benchmarks, each run once at ``weight``, scored with and without the expert term.

    ``synth_manifest`` reuses a written synthetic benchmark (its test split); else one is
    generated under ``out_dir/synth`` as ``anomalyclaw synth`` would (``seed``, ``n_test`` test
    items per domain), so that with the defaults its run is ``anomalyclaw demo``'s. The
    folder is written to ``out_dir/parts`` with ``seed``. ``only`` ("synthetic" or "folder")
    runs one of the two.
    """
    if only not in (None, "synthetic", "folder"):
        raise ValueError(f"unknown benchmark {only!r}: choose synthetic or folder")
    from anomalyclaw.eval.data.synth import generate_benchmark

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AgentConfig(expert_weight=weight)
    plan = []
    if only != "folder":
        if synth_manifest is None:
            synth_manifest = generate_benchmark(out / "synth", seed=seed, n_test_per_domain=n_test)
        plan.append(("synthetic", Path(synth_manifest), "test"))
    if only != "synthetic":
        folder = write_parts_folder(out / "parts", seed=seed)
        plan.append(("folder", import_mvtec_folder(folder, out / "parts_manifest.json", seed=seed), None))
    report: dict[str, Any] = {"weight": weight, "alpha": config.alpha, "seed": seed, "experts": list(FUSION_EXPERTS),
                              "benchmarks": {}}
    for name, manifest, split in plan:
        records, seconds = _run(manifest, out / f"run_{name}", config, split)
        entry = _compare(records, weight, config.alpha)
        entry.update(manifest=str(manifest), records=str(out / f"run_{name}" / RECORDS_FILE), run_s=round(seconds, 1))
        report["benchmarks"][name] = entry
    return report


def format_fusion(report: dict[str, Any]) -> str:
    """One table per benchmark: blend (no expert term), the expert term alone, fused, the
    difference, and fused with each expert of the ensemble alone."""
    w = report["weight"]
    lines = []
    for name, entry in report["benchmarks"].items():
        lines.append(f"{name} ({entry['kept']} items, offline backend): without the expert term (weight 0) vs "
                     f"with it (weight {w:g})")
        singles = [f"fused_{name}" for name in report["experts"]]
        head = f"{'domain':<10}{'n':>5}{'blend':>9}{'expert':>9}{'fused':>9}{'delta':>9}" + \
            "".join(f"{'+' + name + ' only':>18}" for name in report["experts"])
        lines += [head, "-" * len(head)]
        rows = list(entry["per_domain"].items()) + [("macro", dict(entry["macro"], n=entry["kept"]))]
        for code, d in rows:
            expert = f"{d['expert']:>9.4f}" if d.get("expert") is not None else f"{'n/a':>9}"
            lines.append(f"{code:<10}{d['n']:>5}{d['blend']:>9.4f}{expert}{d['fused']:>9.4f}{d['delta']:>+9.4f}"
                         + "".join(f"{d[k]:>18.4f}" for k in singles))
        lines.append("")
    return "\n".join(lines).rstrip()
