"""Benchmarks of the 13 tools: latency per call at a given image size, and evidence quality.

``anomalyclaw bench tools`` prints each tool's median and 95th-percentile latency
on synthetic items (the first, cold call shown apart: it includes one-time reference-set work
such as the experts' fit); ``anomalyclaw bench tools --manifest M`` instead measures, per tool and domain, how well the
tool's ``evidence`` separates anomalous from normal items (AUROC) and how often its main bbox
lands on the ground-truth mask.
"""
from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.imaging import load_mask
from anomalyclaw.items import Item
from anomalyclaw.tools import ItemContext, ToolRegistry
from anomalyclaw.cache import clear_caches

#: Synthetic domains the latency benchmark draws items from: together every tool applies.
BENCH_DOMAINS = ("S2", "S1", "S7", "S6")
#: Arguments for a representative call (a candidate bbox where the tool takes one).
BENCH_ARGS: dict[str, dict[str, Any]] = {
    "side_by_side_compare": {"bbox": [0.3, 0.3, 0.6, 0.6]},
    "region_zoom": {"bbox": [0.3, 0.3, 0.6, 0.6], "scale": 2.0},
}
#: Tools that need no expert (the "interactive" ones should stay well under 100 ms).
EXPERT_TOOLS = ("subspace_ad_score", "anomaly_vfm_score", "expert_heatmap")


def _pick_items(items: Sequence[Item], registry: ToolRegistry) -> dict[str, Item]:
    """For each tool, the first anomalous item (in BENCH_DOMAINS order) it applies to."""
    ordered = sorted(items, key=lambda it: (BENCH_DOMAINS.index(it.domain_code)
                                            if it.domain_code in BENCH_DOMAINS else 99, -(it.label or 0)))
    picked = {}
    for name in registry.names():
        entry = registry.entry(name)
        for it in ordered:
            if entry.applicability.check(it)[0]:
                picked[name] = it
                break
    return picked


def run_tool_benchmark(size: int = 512, repeats: int = 30, *, work_side: int | None = None,
                       tools: Sequence[str] | None = None, data_dir: str | Path | None = None) -> list[dict]:
    """Latency of each tool on synthetic ``size`` x ``size`` images.

    Per tool: ``first_ms`` is one cold call (empty caches and a fresh expert pool: it includes
    the reference set's one-time work, e.g. an expert's fit or the references' pairwise
    registration); ``median_ms`` and ``p95_ms`` are over ``repeats`` warm calls, each on a
    fresh :class:`ItemContext` with its images already loaded (a new item of the same reference
    set: per-item work such as registering the query or scoring it with the expert is counted;
    disk I/O and per-reference-set work are not). ``median_cpu_ms`` is the process CPU time of
    the same calls (all threads): a check on wall times taken on a busy machine. Returns one
    dict per tool.
    """
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.experts.pool import ExpertPool

    registry = ToolRegistry.default()
    names = list(tools or registry.names())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(data_dir) if data_dir is not None else Path(tmp)
        manifest = generate_benchmark(folder, seed=0, n_test_per_domain=2, n_calibration=0, n_dev=0,
                                      size=size, domains=list(BENCH_DOMAINS))
        items = load_manifest(manifest)
        picked = _pick_items(items, registry)
        rows = []
        for name in names:
            item = picked.get(name)
            if item is None:
                rows.append({"tool": name, "error": "no synthetic item it applies to"})
                continue
            args = BENCH_ARGS.get(name, {})
            clear_caches()
            pool = ExpertPool(backbone="classic")
            side = work_side or max(size, 32)
            ctx = ItemContext(item, work_side=side, expert_pool=pool).preload()
            start = time.perf_counter()
            obs = registry.run(name, args, ctx)
            first = time.perf_counter() - start
            wall, cpu = [], []
            for _ in range(repeats):
                ctx = ItemContext(item, work_side=side, expert_pool=pool).preload()
                start, start_cpu = time.perf_counter(), time.process_time()
                registry.run(name, args, ctx)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            ms = np.array(wall) * 1000.0
            rows.append({"tool": name, "item": item.item_id, "size": size, "ok": obs.ok,
                         "first_ms": round(first * 1000.0, 1), "median_ms": round(float(np.median(ms)), 1),
                         "p95_ms": round(float(np.percentile(ms, 95)), 1),
                         "median_cpu_ms": round(float(np.median(cpu)) * 1000.0, 1), "repeats": repeats,
                         "expert": name in EXPERT_TOOLS, "error": obs.error})
    return rows


def _mask_hit(mask: np.ndarray, bbox: Sequence[float] | None) -> bool:
    if not bbox or list(bbox) == [0.0, 0.0, 1.0, 1.0]:
        return False
    h, w = mask.shape
    x0, y0 = int(bbox[0] * w), int(bbox[1] * h)
    x1, y1 = max(x0 + 1, int(np.ceil(bbox[2] * w))), max(y0 + 1, int(np.ceil(bbox[3] * h)))
    return bool(mask[y0:y1, x0:x1].any())


def evaluate_tools(manifest: str | Path, *, tools: Sequence[str] | None = None, split: str | None = None,
                   domains: Sequence[str] | None = None, work_side: int = 512) -> dict[str, dict[str, dict]]:
    """Per tool and domain, with default arguments (``region_zoom``, which needs a bbox, is
    skipped): ``auroc`` of ``evidence`` against the labels (missing evidence counts as 0),
    mean evidence of normal and anomalous items, ``loc_top1`` = fraction of masked anomalous
    items whose main ``bbox`` touches the mask, ``loc_any`` = the same for any reported region,
    and the median latency. Returns ``{tool: {domain: stats}}``."""
    from sklearn.metrics import roc_auc_score

    registry = ToolRegistry.default()
    names = [n for n in (tools or registry.names()) if n != "region_zoom"]
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for item in load_manifest(manifest, split=split, domains=domains):
        ctx = ItemContext(item, work_side=work_side)
        mask = load_mask(item.mask_path, ctx.query.shape[:2]) if item.mask_path else None
        for name in names:
            if not registry.entry(name).applicability.check(item)[0]:
                continue
            start = time.perf_counter()
            obs = registry.run(name, {}, ctx)
            elapsed = time.perf_counter() - start
            row = {"label": item.label, "evidence": obs.data.get("evidence") or 0.0, "ms": elapsed * 1000.0}
            if mask is not None and mask.any():
                boxes = [r.get("bbox") for r in obs.data.get("regions", []) if isinstance(r, dict)]
                row["top1"] = _mask_hit(mask, obs.data.get("bbox"))
                row["any"] = row["top1"] or any(_mask_hit(mask, b) for b in boxes)
            rows[(name, item.domain_code)].append(row)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (name, domain), rs in sorted(rows.items()):
        labels = [r["label"] for r in rs if r["label"] is not None]
        scores = [r["evidence"] for r in rs if r["label"] is not None]
        loc = [r for r in rs if "top1" in r]
        out[name][domain] = {
            "n": len(rs),
            "auroc": float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None,
            "evidence_normal": float(np.mean([s for s, l in zip(scores, labels) if l == 0])) if 0 in labels else None,
            "evidence_anomalous": float(np.mean([s for s, l in zip(scores, labels) if l == 1])) if 1 in labels else None,
            "loc_top1": float(np.mean([r["top1"] for r in loc])) if loc else None,
            "loc_any": float(np.mean([r["any"] for r in loc])) if loc else None,
            "median_ms": float(np.median([r["ms"] for r in rs])),
        }
    return dict(out)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_quality(result: dict[str, dict[str, dict]]) -> str:
    """:func:`evaluate_tools`'s result as a table."""
    lines = [f"{'tool':22s} {'domain':6s} {'n':>4s} {'AUROC':>6s} {'ev(0)':>6s} {'ev(1)':>6s} "
             f"{'loc@1':>6s} {'loc@any':>7s} {'ms':>7s}"]
    for name, per_domain in result.items():
        for domain, s in per_domain.items():
            lines.append(f"{name:22s} {domain:6s} {s['n']:4d} {_fmt(s['auroc']):>6s} "
                         f"{_fmt(s['evidence_normal'], '.2f'):>6s} {_fmt(s['evidence_anomalous'], '.2f'):>6s} "
                         f"{_fmt(s['loc_top1'], '.2f'):>6s} {_fmt(s['loc_any'], '.2f'):>7s} {s['median_ms']:7.1f}")
    return "\n".join(lines)


def format_latency(rows: list[dict], size: int, repeats: int) -> str:
    """:func:`run_tool_benchmark`'s rows as a table."""
    lines = [f"tool latency at {size} px ({repeats} warm calls; 'first' is one cold call, including one-time "
             "reference-set work such as an expert's fit)",
             f"{'tool':22s} {'median ms':>10s} {'p95 ms':>8s} {'cpu ms':>7s} {'first ms':>9s}"]
    for row in rows:
        if "median_ms" not in row:
            lines.append(f"{row['tool']:22s} {row.get('error')}")
            continue
        lines.append(f"{row['tool']:22s} {row['median_ms']:10.1f} {row['p95_ms']:8.1f} {row['median_cpu_ms']:7.1f} "
                     f"{row['first_ms']:9.1f}" + ("  (expert)" if row["expert"] else "")
                     + ("" if row["ok"] else f"  FAILED: {row['error']}"))
    return "\n".join(lines)
