"""Anomaly-map helpers for tools and reports: scale to [0, 1], colour overlay, boxes, regions.

Boxes are normalized ``[x0, y0, x1, y1]`` in [0, 1] on the map's image (x to the right, y
down; ``x1``, ``y1`` exclusive), the coordinate convention of the VLM replies.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from anomalyclaw.imaging import finite_or_zero


def normalize_map(anomaly_map: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """float32 ``[H, W]`` in [0, 1]: ``(map - low) / (high - low)``, clipped.

    ``low`` / ``high`` default to the map's own minimum and maximum (every map then has a
    hottest spot); pass fixed values, e.g. ``ExpertResult.normal_range``, to keep maps of
    different images comparable. A map with ``high <= low`` becomes all zeros.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must be a 2-D [H, W] array, got shape {values.shape}")
    finite = finite_or_zero(values)
    lo = float(finite.min()) if low is None else float(low)
    hi = float(finite.max()) if high is None else float(high)
    if not hi > lo:
        return np.zeros_like(finite)
    return np.clip((finite - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def overlay_heatmap(image: np.ndarray, anomaly_map01: np.ndarray, alpha: float = 0.45, *,
                    proportional: bool = False) -> np.ndarray:
    """``image`` (H x W x 3 uint8 RGB) blended with the JET colouring of a [0, 1] map (resized
    to the image when needed): H x W x 3 uint8 RGB; red = most anomalous.

    ``proportional=False`` tints the whole image by ``alpha``; ``proportional=True`` blends each
    pixel in proportion to its map value (full ``alpha`` from 0.4 up), so that unremarkable
    pixels keep their own appearance, which is how the tools show evidence to a VLM.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.nan_to_num(np.asarray(anomaly_map01, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    if proportional:
        weight = np.minimum(heat * (alpha / 0.4), alpha)
        return cv2.blendLinear(coloured, image, weight, 1.0 - weight)
    return cv2.addWeighted(image, 1.0 - alpha, coloured, alpha, 0.0)


def _normalized_box(x: int, y: int, w: int, h: int, shape: tuple[int, int]) -> list[float]:
    height, width = shape
    return [round(x / width, 4), round(y / height, 4), round((x + w) / width, 4), round((y + h) / height, 4)]


def suggest_bbox(anomaly_map01: np.ndarray, quantile: float = 0.98, relative_level: float = 0.5,
                 min_peak: float = 0.0) -> list[float] | None:
    """The box around the hottest connected region, normalized, or None for a flat map.

    The region is the connected set of pixels containing the peak whose value is at least
    ``max(quantile of the map, relative_level * peak)``: the quantile keeps the box tight
    on a map that is warm everywhere, the relative level keeps it to the peak's own blob.
    None when the map is flat or its peak is below ``min_peak``.
    """
    values = np.asarray(anomaly_map01, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map01 must be a 2-D [H, W] array, got shape {values.shape}")
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    peak = float(values.max())
    if peak - float(values.min()) < 1e-6 or peak < min_peak:
        return None
    level = max(float(np.quantile(values, quantile)), relative_level * peak)
    _, labels, stats, _ = cv2.connectedComponentsWithStats((values >= level).astype(np.uint8), connectivity=8)
    peak_row, peak_col = np.unravel_index(int(np.argmax(values)), values.shape)
    x, y, w, h, _ = stats[labels[peak_row, peak_col]]
    return _normalized_box(int(x), int(y), int(w), int(h), values.shape)


def top_regions(anomaly_map01: np.ndarray, k: int = 3, level: float = 0.5,
                min_area_frac: float = 0.0005) -> list[dict[str, Any]]:
    """Up to ``k`` connected regions where the map is at least ``level``, hottest first.

    Each is ``{"bbox": [x0, y0, x1, y1] normalized, "peak": max value in it, "area_frac":
    its share of the image}``; regions smaller than ``min_area_frac`` of the image are noise
    and left out.
    """
    values = np.asarray(anomaly_map01, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map01 must be a 2-D [H, W] array, got shape {values.shape}")
    count, labels, stats, _ = cv2.connectedComponentsWithStats((values >= level).astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    peaks = np.concatenate([[0.0], ndimage.maximum(values, labels, index=np.arange(1, count))])
    total = float(values.size)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area / total < min_area_frac:
            continue
        regions.append({"bbox": _normalized_box(x, y, w, h, values.shape),
                        "peak": round(float(peaks[label]), 4), "area_frac": round(area / total, 5)})
    regions.sort(key=lambda r: r["peak"], reverse=True)
    return regions[:k]
