"""Pixel metrics of a run's anomaly maps against ground-truth masks: pixel AUROC, AUPRO to FPR
0.3, and the box hit rate, for the agent's map and the expert's map alone, per domain and macro.

Conventions (MVTec AD, as anomalib reports them):

* **Pixel AUROC** pools every pixel of every item with a known mask in a domain; normal items
  count as all-normal masks; anomalous items without a mask are left out. scikit-learn's
  ``roc_auc_score``.
* **AUPRO** is the area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (1.0 = every defect region fully found before any normal pixel fires). Regions
  are the 8-connected components of each mask (SciPy's ``ndimage.label``); the overlap of a
  threshold is the mean over all regions of the share of the region's pixels at or above it, the
  FPR the share of all normal pixels at or above it. The curve is computed exactly at every
  distinct score (no threshold binning), then integrated with the trapezoid rule, the last
  segment cut at the limit by linear interpolation (as MVTec's ``trapezoid(..., x_max)``).
* **Box hit rate**: the share of anomalous items with a mask whose best confirmed box (highest
  score) holds at least one mask pixel; an item with no confirmed box is a miss.

Maps and masks are compared at the map's shape with the longer side capped at
:data:`METRIC_SIDE` (maps area-averaged, masks nearest), so memory stays bounded.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomalyclaw.graph.localize import decode_map
from anomalyclaw.graph.localization import MAP_SIDE, box_mask, map_shape, valid_bbox
from anomalyclaw.imaging import load_mask

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.metrics import by_domain

#: Longest side at which maps and masks are compared (MVTec evaluations commonly use 256): the
#: side the runner writes maps at.
METRIC_SIDE = MAP_SIDE
#: AUPRO integrates the overlap curve up to this false-positive rate (the MVTec AD convention).
FPR_LIMIT = 0.3
MAPS = ("agent", "expert")

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """AUROC of every pixel of ``maps`` against ``masks`` (bool, same shapes); NaN when the
    pixels hold one class only."""
    if not masks:
        return float("nan")
    labels = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    scores = np.concatenate([np.asarray(s, np.float32).ravel() for s in maps])
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pro_curve(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct score, from (0, 0) to (1, 1), fpr non-decreasing.

    Each pixel of a region of ``k`` pixels (one of ``R`` regions over all masks) adds
    ``1 / (R * k)`` to the overlap when the threshold passes its score; each normal pixel adds
    ``1 / N`` to the FPR. Raises ValueError when there is no region or no normal pixel.
    """
    scores, normal, weight = [], [], []
    n_regions = 0
    labelled = []
    for mask in masks:
        labels, count = ndimage.label(np.asarray(mask, bool), structure=_EIGHT_CONNECTED)
        labelled.append((labels, count, n_regions))
        n_regions += count
    if n_regions == 0:
        raise ValueError("no ground-truth region: AUPRO needs at least one anomalous pixel")
    for (labels, count, offset), amap in zip(labelled, maps):
        amap = np.asarray(amap, np.float32)
        if amap.shape != labels.shape:
            raise ValueError(f"map shape {amap.shape} differs from its mask's {labels.shape}")
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        per_pixel = np.zeros(labels.size)
        inside = labels.ravel() > 0
        per_pixel[inside] = 1.0 / (n_regions * sizes[labels.ravel()[inside]])
        scores.append(amap.ravel())
        normal.append(~inside)
        weight.append(per_pixel)
    s = np.concatenate(scores)
    is_normal = np.concatenate(normal)
    w = np.concatenate(weight)
    n_normal = int(is_normal.sum())
    if n_normal == 0:
        raise ValueError("no normal pixel: AUPRO needs a false-positive rate")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    fpr = np.cumsum(is_normal[order]) / n_normal
    pro = np.cumsum(w[order])
    # One point per distinct score: the last pixel of each group of equal scores.
    ends = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    return np.r_[0.0, fpr[ends]], np.r_[0.0, np.minimum(pro[ends], 1.0)]


def area_to(fpr: np.ndarray, pro: np.ndarray, limit: float = FPR_LIMIT) -> float:
    """Trapezoid area under (fpr, pro) from 0 to ``limit``, divided by ``limit``."""
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
    k = int(np.searchsorted(fpr, limit, side="right"))  # first point beyond the limit
    x, y = list(fpr[:k]), list(pro[:k])
    if k < len(fpr) and x[-1] < limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        x.append(limit)
        y.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    x_arr, y_arr = np.asarray(x), np.asarray(y)
    return float(np.sum(np.diff(x_arr) * (y_arr[1:] + y_arr[:-1]) / 2.0) / limit)


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], limit: float = FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve to FPR ``limit``; NaN without a
    region or without a normal pixel."""
    try:
        fpr, pro = pro_curve(masks, maps)
    except ValueError:
        return float("nan")
    return area_to(fpr, pro, limit)


def best_box_hits(record: Record, mask: np.ndarray) -> bool:
    """True when the record's highest-scoring confirmed box holds a pixel of ``mask``."""
    boxes = [b for b in ((record.localization or {}).get("boxes") or []) if isinstance(b, dict)]
    scored = [(b.get("score") if isinstance(b.get("score"), (int, float)) else 0.0, valid_bbox(b.get("bbox")))
              for b in boxes]
    scored = [(s, b) for s, b in scored if b is not None]
    if not scored:
        return False
    best = max(scored, key=lambda sb: sb[0])[1]
    return bool((box_mask(best, mask.shape) & mask).any())


def _read_map(run_dir: Path, rel: Any) -> np.ndarray | None:
    if not isinstance(rel, str) or not rel:
        return None
    root = (run_dir / "maps").resolve()
    path = (run_dir / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():  # a path from a record: only OUT/maps
        return None
    try:
        return decode_map(path.read_bytes())
    except (OSError, ValueError):
        return None


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_pixels(records: Sequence[Record], items: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Pixel AUROC and AUPRO of the agent's and the expert's maps, and the box hit rate, per
    domain and macro (unweighted mean over domains with a value).

    ``items`` maps item ids to manifest :class:`~anomalyclaw.items.Item` (for ``mask_path`` and
    the label); ``run_dir`` is where the records' ``maps/`` are. Items count when they have a
    label, a mask or are normal, and both maps on disk (``n_items``); anomalous items without a
    mask, and items without maps, are counted apart (``no_mask``, ``no_map``). Returns ``{"agent":
    {"auroc", "aupro"}, "expert": {...}, "box_hit_rate", "per_domain": {code: {"agent",
    "expert", "box_hit_rate", "n_items", "n_anomalous", "no_mask", "no_map"}}}``.
    """
    run = Path(run_dir)
    per_domain: dict[str, dict[str, Any]] = {}
    for code, group in by_domain(r for r in records if not r.error and r.localization is not None).items():
        masks: list[np.ndarray] = []
        maps: dict[str, list[np.ndarray]] = defaultdict(list)
        hits: list[bool] = []
        no_mask = no_map = 0
        for record in group:
            item = items.get(record.item_id)
            label = record.label_gt if record.label_gt is not None else getattr(item, "label", None)
            if item is None or label is None:
                continue
            mask_path = getattr(item, "mask_path", None)
            if label == 1 and mask_path is None:
                no_mask += 1
                continue
            loaded = {name: _read_map(run, record.localization.get("map" if name == "agent" else "expert_map"))
                      for name in MAPS}
            shape = next((m.shape for m in loaded.values() if m is not None), None)
            if label == 1 and shape is None:  # boxes still count where maps are off
                shape = tuple(record.localization.get("map_shape") or (METRIC_SIDE, METRIC_SIDE))
            try:
                full = load_mask(mask_path, shape) if label == 1 else None
            except Exception:  # an unreadable mask: the item cannot be scored, the rest can
                no_mask += 1
                continue
            if label == 1:
                hits.append(best_box_hits(record, full))
            if any(m is None for m in loaded.values()):
                no_map += 1
                continue
            small = map_shape(shape)
            mask = (np.zeros(small, bool) if full is None else
                    cv2.resize(full.astype(np.uint8), (small[1], small[0]), interpolation=cv2.INTER_NEAREST) > 0)
            masks.append(mask)
            for name, m in loaded.items():
                if m.shape != shape:
                    m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
                maps[name].append(cv2.resize(m, (small[1], small[0]), interpolation=cv2.INTER_AREA))
        entry: dict[str, Any] = {name: {"auroc": pixel_auroc(masks, maps[name]), "aupro": aupro(masks, maps[name])}
                                 for name in MAPS}
        entry.update(box_hit_rate=float(np.mean(hits)) if hits else float("nan"), n_items=len(masks),
                     n_anomalous=sum(int(m.any()) for m in masks), no_mask=no_mask, no_map=no_map)
        per_domain[code] = entry
    out: dict[str, Any] = {name: {metric: _mean([d[name][metric] for d in per_domain.values()])
                                  for metric in ("auroc", "aupro")} for name in MAPS}
    out["box_hit_rate"] = _mean([d["box_hit_rate"] for d in per_domain.values()])
    out["per_domain"] = per_domain
    return out


def format_pixel_table(result: dict[str, Any]) -> str:
    """The pixel metrics as a fixed-width table, one row per domain plus the macro mean."""
    head = (f"{'domain':<10}{'n':>6}{'anom':>6} | {'agent AUROC':>11}{'AUPRO':>8} | {'expert AUROC':>12}"
            f"{'AUPRO':>8} | {'box hit':>7}")
    lines = [head, "-" * len(head)]

    def cell(v: Any, width: int) -> str:
        return f"{v:>{width}.4f}" if isinstance(v, float) and math.isfinite(v) else f"{'n/a':>{width}}"

    def row(name: str, d: dict[str, Any], n: Any, anom: Any) -> str:
        return (f"{name:<10}{n:>6}{anom:>6} | {cell(d['agent']['auroc'], 11)}{cell(d['agent']['aupro'], 8)} | "
                f"{cell(d['expert']['auroc'], 12)}{cell(d['expert']['aupro'], 8)} | {cell(d['box_hit_rate'], 7)}")

    for code, d in result["per_domain"].items():
        lines.append(row(code, d, d["n_items"], d["n_anomalous"]))
    lines.append("-" * len(head))
    lines.append(row("macro", result, sum(d["n_items"] for d in result["per_domain"].values()), ""))
    left = {k: sum(d[k] for d in result["per_domain"].values()) for k in ("no_mask", "no_map")}
    if left["no_mask"] or left["no_map"]:
        lines.append(f"(left out: {left['no_mask']} anomalous items without a mask, {left['no_map']} items "
                     "without map files)")
    return "\n".join(lines)
