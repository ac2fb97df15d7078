"""Benchmark the frozen experts alone: image and pixel AUROC per domain, fit and score times.

    anomalyclaw bench experts --manifest synth/manifest.json [--split test]

Each item's query is scored by each expert fitted on the item's own references (through an
:class:`~anomalyclaw.experts.pool.ExpertPool`, so a reference set shared by many items is
fitted once), with the parameters :func:`~anomalyclaw.experts.pool.default_params` picks from
the item's domain traits (positional patch kNN on aligned domains) unless told otherwise.
Image AUROC ranks the items by expert score. Pixel AUROC follows the MVTec
convention: every pixel of every item with a known mask, normal items counting as all-normal
masks; anomalous items without a mask are left out of it.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.eval.scoring.metrics import auroc
from anomalyclaw.experts.pool import EXPERTS, ExpertPool, default_params
from anomalyclaw.imaging import load_image, load_mask

#: Images are loaded at most this large (the agent's default work side).
WORK_SIDE = 512
#: Maps and masks are compared at most this large: enough for AUROC, bounded memory.
PIXEL_SIDE = 128


def _small(array: np.ndarray, side: int, *, nearest: bool = False) -> np.ndarray:
    h, w = array.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return array
    return cv2.resize(array, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def run_expert_benchmark(manifest_path: str | Path, split: str | None = "test", backbone: str = "classic", *,
                         backbone_path: str | None = None, device: str = "auto",
                         domains: Sequence[str] | None = None, experts: Sequence[str] = tuple(EXPERTS),
                         expert_params: dict[str, dict[str, Any]] | None = None,
                         held_out: str = "shared") -> dict[str, Any]:
    """Score every item of ``split`` (None: all items) with each expert and summarise.

    ``expert_params`` maps an expert name to constructor keywords for every item (e.g.
    ``{"anomaly_vfm": {"positional_radius": None}}`` turns the positional search off);
    without an entry, an expert gets ``default_params(name, item.traits)``. ``held_out``:
    the pool's leave-one-out method (``"direct"``: the original refits, for a before/after
    comparison; see :class:`~anomalyclaw.experts.pool.ExpertPool`). Returns ``{"manifest", "split",
    "backbone", "items", "per_domain": {code: {"n", "n_anomalous", "n_masked", expert:
    {"image_auroc", "pixel_auroc", "fit_ms", "score_ms"}}}, "macro": {expert: {"image_auroc",
    "pixel_auroc"}}, "pool": pool stats, "records": [per-item scores]}``.
    """
    unknown = set(experts) - set(EXPERTS)
    if unknown:
        raise ValueError(f"unknown expert(s) {sorted(unknown)}; choose from {sorted(EXPERTS)}")
    items = load_manifest(manifest_path, split=split, domains=domains)
    if not items:
        raise AnomalyClawError(f"{manifest_path}: no items for split {split!r}"
                               + (f" and domains {list(domains)}" if domains else ""))
    params = expert_params or {}
    pool = ExpertPool(backbone, backbone_path=backbone_path, device=device, held_out=held_out)
    records: list[dict[str, Any]] = []
    fit_seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    pixel_scores: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    pixel_labels: dict[str, list[np.ndarray]] = defaultdict(list)
    for item in items:
        query = load_image(item.query_path, max_side=WORK_SIDE)
        mask = None
        if item.mask_path is not None:
            mask = load_mask(item.mask_path, query.shape[:2])
        elif item.label == 0:
            mask = np.zeros(query.shape[:2], bool)
        if mask is not None:
            pixel_labels[item.domain_code].append(_small(mask.astype(np.uint8), PIXEL_SIDE, nearest=True).ravel())
        record: dict[str, Any] = {"item_id": item.item_id, "domain_code": item.domain_code, "label": item.label}
        for name in experts:
            load_seconds = []

            def references(paths=item.ref_paths, spent=load_seconds) -> list[np.ndarray]:
                start = time.perf_counter()
                images = [load_image(p, max_side=WORK_SIDE) for p in paths]
                spent.append(time.perf_counter() - start)
                return images

            misses = pool.stats["misses"]
            start = time.perf_counter()
            chosen = params[name] if name in params else default_params(name, item.traits)
            expert = pool.expert(name, item.reference_set_key, references, **chosen)
            if pool.stats["misses"] > misses:
                fit_seconds[(item.domain_code, name)].append(time.perf_counter() - start - sum(load_seconds))
            result = expert.score(query)
            record[name] = {"score": result.score, "rank": result.rank, "score_s": result.elapsed_s}
            if mask is not None:
                pixel_scores[(item.domain_code, name)].append(_small(result.anomaly_map, PIXEL_SIDE).ravel())
        records.append(record)

    per_domain: dict[str, dict[str, Any]] = {}
    for code in sorted({r["domain_code"] for r in records}, key=lambda c: (len(c), c)):
        rows = [r for r in records if r["domain_code"] == code]
        labels = [r["label"] for r in rows if r["label"] is not None]
        summary: dict[str, Any] = {"n": len(rows), "n_anomalous": int(sum(labels)),
                                   "n_masked": len(pixel_labels[code])}
        for name in experts:
            scored = [r for r in rows if r["label"] is not None]
            pixel_auroc = float("nan")
            if pixel_labels[code]:
                pixel_auroc = auroc(np.concatenate(pixel_labels[code]), np.concatenate(pixel_scores[(code, name)]))
            fits = fit_seconds[(code, name)]
            summary[name] = {
                "image_auroc": auroc([r["label"] for r in scored], [r[name]["score"] for r in scored]),
                "pixel_auroc": pixel_auroc,
                "fit_ms": 1000 * float(np.mean(fits)) if fits else float("nan"),
                "score_ms": 1000 * float(np.mean([r[name]["score_s"] for r in rows])),
            }
        per_domain[code] = summary
    macro = {}
    for name in experts:
        macro[name] = {}
        for metric in ("image_auroc", "pixel_auroc"):
            values = [d[name][metric] for d in per_domain.values() if not math.isnan(d[name][metric])]
            macro[name][metric] = float(np.mean(values)) if values else float("nan")
    return {"manifest": str(manifest_path), "split": split, "backbone": backbone, "held_out": held_out,
            "items": len(records),
            "experts": list(experts), "expert_params": params, "per_domain": per_domain, "macro": macro,
            "pool": pool.stats, "records": records}


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table, one row per domain plus the macro mean."""
    experts = report["experts"]
    head = f"{'domain':<8}{'n':>4}{'anom':>5}{'mask':>5}"
    for name in experts:
        head += f" | {name + ' img':>16}{'pix':>7}{'fit ms':>8}{'score ms':>9}"
    lines = [head, "-" * len(head)]

    def cell(value: float, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{digits}f}"

    for code, d in report["per_domain"].items():
        line = f"{code:<8}{d['n']:>4}{d['n_anomalous']:>5}{d['n_masked']:>5}"
        for name in experts:
            e = d[name]
            line += (f" | {cell(e['image_auroc'], 16)}{cell(e['pixel_auroc'], 7)}"
                     f"{cell(e['fit_ms'], 8, 0)}{cell(e['score_ms'], 9, 1)}")
        lines.append(line)
    line = f"{'macro':<8}{report['items']:>4}{'':>5}{'':>5}"
    for name in experts:
        m = report["macro"][name]
        line += f" | {cell(m['image_auroc'], 16)}{cell(m['pixel_auroc'], 7)}{'':>8}{'':>9}"
    lines += ["-" * len(head), line]
    return "\n".join(lines)


def positional_params(value: str) -> dict[str, dict[str, Any]]:
    """Expert parameters for ``--positional``: ``traits`` (the default: positional search, radius
    1, on aligned domains only), ``off`` (free search everywhere) or a radius in patch cells for
    every item."""
    if value == "traits":
        return {}
    if value == "off":
        return {"anomaly_vfm": {"positional_radius": None}}
    if value.isdigit():
        return {"anomaly_vfm": {"positional_radius": int(value)}}
    raise ValueError(f"--positional must be 'traits', 'off' or a number of cells, got {value!r}")
