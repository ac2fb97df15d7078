"""Registered difference maps of the query, calibrated by the references' own differences.

The the query is registered to each of its closest references and compared in Lab
(a shift-tolerant Delta E, after matching global lightness and smooth shading); the per-pixel
minimum over those references is the query's difference map. The same is done for every
reference against the other references (leave-one-out), once per reference set; the per-pixel
maximum of those maps, widened a little to forgive misregistration, is how much normal images
differ from each other at each pixel. Their ratio, the *excess*, is what ``image_diff``,
``segment_anomaly`` and ``change_heatmap_viz`` threshold: an excess of 1 means "differs as much
as references differ among themselves there"; 1.5 or more is unusual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from anomalyclaw.imaging import resize_to

from .item_context import ItemContext
from .imageops import blur, match_illumination, register, to_smooth_lab, tolerant_delta_e

#: Difference maps are computed with the longer side capped at this many pixels (cost).
DIFF_SIDE = 320
#: Registration for difference maps runs on copies with at most this many pixels a side (less
#: than a single registration's default, :data:`~anomalyclaw.tools.imageops.REGISTRATION_SIDE`:
#: a map needs many); the shift tolerance forgives the sub-pixel error this leaves.
DIFF_REGISTRATION_SIDE = 192
#: The query is compared with this many closest references (per-pixel minimum).
DIFF_REFS = 2
#: The baseline uses the first this-many references of the set (leave-one-out among them).
BASELINE_REFS = DIFF_REFS + 1
#: Delta E below which a difference is never "unusual" (about 2 just-noticeable differences).
BASELINE_FLOOR_DE = 4.0
#: Used instead of a measured baseline when the item has a single reference (no leave-one-out):
#: a clearly visible colour difference.
UNCALIBRATED_BASELINE_DE = 12.0
#: Shift a feature may have between normal images, as a fraction of the image side.
SHIFT_TOLERANCE = 0.015
#: Excess above which pixels form a region.
REGION_EXCESS = 1.5
#: Excess of full evidence: the difference tools' evidence ramps from REGION_EXCESS up to this
#: (their scalar evidence from a region's peak, their evidence masks per pixel).
FULL_EXCESS = 4.0
#: Expert maps on the references' scale (0 = an ordinary normal patch, 1 = the most unusual
#: normal reference): the level that outlines a region, and the level of full evidence.
MAP_REGION_LEVEL = 1.0
MAP_FULL_LEVEL = 2.0


@dataclass
class DiffAnalysis:
    """The query's registered difference to its closest references, and its excess over normal."""

    diff: np.ndarray
    """float32 (H, W): per-pixel min over the compared references of Delta E after registration."""
    baseline: np.ndarray
    """float32 (H, W): the references' own leave-one-out Delta E (upper envelope, >= floor)."""
    excess: np.ndarray
    """float32 (H, W): blurred diff / baseline; 1 = as different as references are from each other."""
    valid: np.ndarray
    """bool (H, W): pixels covered by at least one registered reference."""
    ref_indices: list[int]
    calibrated: bool
    """False when the item has a single reference, so the baseline is a fixed Delta E."""
    registrations: list[dict] = field(default_factory=list)
    """Per compared reference: index, shift (px), angle (deg), ECC correlation, method."""
    warped: dict[int, np.ndarray] = field(default_factory=dict)
    """Each compared reference registered onto the query (RGB uint8)."""


def _registered_delta_e(moving: np.ndarray, fixed: np.ndarray, fixed_lab: np.ndarray,
                        illumination: tuple[int, ...], motion: str):
    """``moving`` registered onto ``fixed``, lighting matched on ``illumination`` channels, then
    the shift-tolerant Delta E to ``fixed_lab``: (float32 (H, W) map, inf outside the warp;
    the :class:`~anomalyclaw.tools.imageops.Registration`)."""
    reg = register(moving, fixed, motion=motion, max_side=DIFF_REGISTRATION_SIDE)
    moving_lab = to_smooth_lab(reg.warped)
    if illumination:
        moving_lab = match_illumination(moving_lab, fixed_lab, reg.valid, illumination)
        moving_lab = match_shading(moving_lab, fixed_lab, reg.valid, illumination)
    d = tolerant_delta_e(fixed_lab, moving_lab, shift_tolerance(fixed_lab.shape))
    d[~reg.valid] = np.inf
    return d, reg


def shift_tolerance(shape: tuple[int, ...]) -> int:
    """Pixels a feature may move between normal images (parts jitter, registration is not
    perfect) before it counts as a difference: 1.5% of the image side, at least 1 px."""
    return max(1, int(round(SHIFT_TOLERANCE * max(shape[:2]))))


def match_shading(moving_lab: np.ndarray, fixed_lab: np.ndarray, valid: np.ndarray,
                  channels: tuple[int, ...] = (0,)) -> np.ndarray:
    """Remove smooth differences of lighting (vignetting, a shadow band, uneven exposure) and,
    for colour ``channels``, of colour cast: each channel of ``moving_lab`` is shifted by the
    difference of the two images blurred at 1/8 of the image side. Structures much smaller than
    that (defects, buildings) are kept; one as large as the blur loses a small part of its
    contrast."""
    sigma = max(moving_lab.shape[:2]) / 8.0
    weight = np.maximum(blur(valid.astype(np.float32), sigma), 1e-3)
    out = moving_lab.copy()
    for c in channels:
        diff = np.where(valid, fixed_lab[:, :, c] - moving_lab[:, :, c], 0.0).astype(np.float32)
        out[:, :, c] += blur(diff, sigma) / weight
    return out


def _border(shape: tuple[int, ...]) -> np.ndarray:
    """bool (H, W): False on a rim of 2% of the side (>= 4 px), where registration and the
    capture's own border effects make differences meaningless."""
    h, w = shape[:2]
    m = max(4, int(round(0.02 * max(h, w))))
    inner = np.zeros((h, w), bool)
    inner[m:h - m, m:w - m] = True
    return inner


def _spread(baseline: np.ndarray) -> np.ndarray:
    """Widen a baseline so that a feature shifted by a few pixels in the query is still covered."""
    side = max(baseline.shape)
    k = max(3, int(round(side / 64)) | 1)
    return blur(cv2.dilate(baseline, np.ones((k, k), np.uint8)), max(1.0, side / 256))


def diff_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) at which difference maps are computed: the query's, with the longer side capped at
    :data:`DIFF_SIDE` (a 0.05%-of-the-image region is still ~8 px there)."""
    h, w = shape[:2]
    scale = min(1.0, DIFF_SIDE / max(h, w))
    return max(8, round(h * scale)), max(8, round(w * scale))


def diff_view(ctx: ItemContext, index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, blurred Lab) of the query or reference ``index`` at :func:`diff_shape`."""
    small = diff_shape(ctx.query.shape)

    def compute() -> tuple[np.ndarray, np.ndarray]:
        rgb = resize_to(ctx.image(index), small)
        return rgb, to_smooth_lab(rgb)

    if index is None:
        return ctx.item_cached("diff_view", compute)
    return ctx.reference_file_cached(index, "diff_view", compute)


def reference_baseline(ctx: ItemContext, illumination: tuple[int, ...] = (0,),
                       motion: str = "euclidean") -> np.ndarray | None:
    """Per-pixel leave-one-out Delta E of the references among themselves, float32 at
    :func:`diff_shape`; ``None`` with fewer than two references. Cached per reference set, and
    each pair's difference map per pair of files."""
    if ctx.n_references < 2:
        return None
    shape = diff_shape(ctx.query.shape)

    def compute() -> np.ndarray:
        idx = list(range(min(BASELINE_REFS, ctx.n_references)))
        envelope = np.zeros(shape, np.float32)

        def pair(i: int, j: int) -> np.ndarray:
            (moving, _), (fixed, fixed_lab) = diff_view(ctx, i), diff_view(ctx, j)
            return _registered_delta_e(moving, fixed, fixed_lab, illumination, motion)[0].astype(np.float16)

        for j in idx:
            per_ref = np.full(shape, np.inf, np.float32)
            for i in idx:
                if i != j:
                    d = ctx.reference_pair_cached(i, j, f"delta_e{illumination}{motion}", lambda: pair(i, j))
                    np.minimum(per_ref, d, out=per_ref)
            per_ref[~np.isfinite(per_ref)] = 0.0
            np.maximum(envelope, per_ref, out=envelope)
        return np.maximum(_spread(envelope), BASELINE_FLOOR_DE).astype(np.float32)

    return ctx.reference_cached(f"diff_baseline{illumination}{motion}", compute, shape=ctx.query.shape)


def analyse_diff(ctx: ItemContext, *, n_refs: int = DIFF_REFS, illumination: tuple[int, ...] = (0,),
                 motion: str = "euclidean") -> DiffAnalysis:
    """The query against its ``n_refs`` closest references, calibrated by the reference set.

    ``illumination``: Lab channels whose global mean/std and smooth shading are matched before
    differencing ((0,) = lightness only; (0, 1, 2) = lightness and colour cast). Maps are
    computed at :func:`diff_shape` and returned at the query's shape.
    """
    return ctx.item_cached(("diff", n_refs, illumination, motion),
                           lambda: _analyse_diff(ctx, n_refs, illumination, motion))


def _analyse_diff(ctx: ItemContext, n_refs: int, illumination: tuple[int, ...], motion: str) -> DiffAnalysis:
    shape = ctx.query.shape[:2]
    query, query_lab = diff_view(ctx, None)
    scale = shape[1] / query.shape[1]
    indices = ctx.closest_references(min(n_refs, ctx.n_references))
    diff = np.full(query.shape[:2], np.inf, np.float32)
    regs, warped = [], {}
    for i in indices:
        d, reg = _registered_delta_e(diff_view(ctx, i)[0], query, query_lab, illumination, motion)
        np.minimum(diff, d, out=diff)
        warped[i] = resize_to(reg.warped, shape)
        regs.append({"reference": i, "shift_px": [round(v * scale, 1) for v in reg.shift_px],
                     "angle_deg": round(reg.angle_deg, 2), "correlation": round(reg.correlation, 3),
                     "method": reg.method})
    valid = np.isfinite(diff) & _border(diff.shape)
    diff[~valid] = 0.0
    baseline = reference_baseline(ctx, illumination, motion)
    calibrated = baseline is not None
    if baseline is None:
        baseline = np.full(diff.shape, UNCALIBRATED_BASELINE_DE, np.float32)
    excess = blur(diff, max(1.0, max(diff.shape) / 256)) / baseline
    excess[~valid] = 0.0
    if diff.shape != shape:
        diff, baseline, excess = (cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
                                  for m in (diff, baseline, excess))
        valid = cv2.resize(valid.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return DiffAnalysis(diff, baseline, excess.astype(np.float32), valid, indices, calibrated, regs, warped)


def expert_map_at(ctx: ItemContext, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Expert ``name``'s raw anomaly map at the query's shape, or ``shape`` (H, W): float32,
    resized once per item and shape (the excess map and the expert's own map file both read it)."""
    h, w = (int(v) for v in (shape or ctx.query.shape[:2]))

    def resized() -> np.ndarray:
        amap = ctx.expert_result(name).anomaly_map
        if amap.shape[:2] == (h, w):
            return amap
        return cv2.resize(amap, (w, h), interpolation=cv2.INTER_AREA if h < amap.shape[0] else cv2.INTER_LINEAR)

    return ctx.item_cached(("expert_map_at", name, h, w), resized)


def expert_excess_map(ctx: ItemContext, name: str,
                      shape: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """(excess map, (typical, threshold)): expert ``name``'s anomaly map at the query's shape (or
    ``shape``, (H, W)) on the references' own scale, float32 (H, W): 0 = an ordinary normal patch
    (``typical``), 1 = the expert's threshold (the image score of the most unusual reference,
    leave-one-out)."""
    result = ctx.expert_result(name)
    typical, threshold = getattr(result, "normal_range", (0.0, result.threshold))
    typical, threshold = float(typical), float(threshold)
    if not threshold > typical:  # a degenerate scale: fall back to a ratio to the threshold
        typical = 0.0
    amap = expert_map_at(ctx, name, shape)
    scale = max(threshold - typical, 1e-9)
    return ((amap - typical) / scale).astype(np.float32), (typical, threshold)


def diff_illumination(ctx: ItemContext) -> tuple[int, ...]:
    """Lab channels to match before differencing: lightness only, and colour cast too on
    bi-temporal items (a season recolours a whole landscape; that is not a change)."""
    return (0, 1, 2) if "bi_temporal" in ctx.traits else (0,)


def min_region_area(shape: tuple[int, ...]) -> int:
    """Smallest region worth reporting: 0.05% of the image, at least 9 px."""
    return max(9, int(0.0005 * shape[0] * shape[1]))
