"""Structure and texture tools: blob layout, bi-temporal change map, and Fourier spectrum.

Each turns one structural property (how many parts and where, what changed since the "before"
image, which periodicities a surface has) into numbers compared with the references' own.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import BaseModel, Field
from scipy import fft as sfft
from scipy.optimize import linear_sum_assignment

from anomalyclaw.experts.maps import overlay_heatmap

from .applicability import Applicability
from .difference import FULL_EXCESS, REGION_EXCESS, UNCALIBRATED_BASELINE_DE, analyse_diff, min_region_area
from .factory import make_tool
from .item_context import ItemContext
from .observation import TOOL_OVERLAY_ALPHA, Observation, evidence_mask, image_payload, ramp, with_notes
from .regions import BBOX_DESCRIPTION, px_to_norm, resolve_bbox
from .statistics import count_deviation
from .imageops import (CYAN, GREEN, RED, YELLOW, captioned, draw_box, excess_regions, find_blobs,
                       hstack)

FAMILY = "structure / texture"


# ---------------------------------------------------------------------------- blob_layout_viz

class BlobLayoutArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; count only blobs whose centre "
                                     "is inside it, or omit for the whole image")


#: Two blobs match when their centres are closer than this fraction of the image diagonal and
#: their areas differ by less than this factor.
MATCH_DISTANCE = 0.06
MATCH_AREA_RATIO = 2.0
MAX_LAYOUT_REFS = 10


def match_blobs(a: list[dict], b: list[dict]) -> dict:
    """Pair blobs of ``a`` and ``b`` by position and size (Hungarian assignment).

    Returns ``pairs`` (index in a, index in b), ``extra`` (unmatched in a), ``missing``
    (unmatched in b), and over the pairs the largest ``shift`` (centre distance, fraction of
    the image diagonal) and ``resize`` (|log area ratio|) with the pair each comes from.
    """
    out = {"pairs": [], "extra": list(range(len(a))), "missing": list(range(len(b))),
           "shift": 0.0, "shift_pair": None, "resize": 0.0, "resize_pair": None}
    if not a or not b:
        return out
    ca = np.array([x["centre"] for x in a])
    cb = np.array([x["centre"] for x in b])
    dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2) / math.sqrt(2.0)
    log_ratio = np.abs(np.log(np.array([x["area"] for x in a])[:, None] / np.array([x["area"] for x in b])[None, :]))
    rows, cols = linear_sum_assignment(dist + 0.02 * log_ratio)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols)
             if dist[r, c] <= MATCH_DISTANCE and log_ratio[r, c] <= math.log(MATCH_AREA_RATIO)]
    out["pairs"] = pairs
    out["extra"] = sorted(set(range(len(a))) - {p[0] for p in pairs})
    out["missing"] = sorted(set(range(len(b))) - {p[1] for p in pairs})
    if pairs:
        out["shift_pair"] = max(pairs, key=lambda p: dist[p])
        out["resize_pair"] = max(pairs, key=lambda p: log_ratio[p])
        out["shift"] = float(dist[out["shift_pair"]])
        out["resize"] = float(log_ratio[out["resize_pair"]])
    return out


def _in_box(blobs: list[dict], norm: tuple[float, ...] | None) -> list[dict]:
    if norm is None:
        return blobs
    return [b for b in blobs if norm[0] <= b["centre"][0] <= norm[2] and norm[1] <= b["centre"][1] <= norm[3]]


#: Floors of the references' typical largest shift (fraction of the diagonal) and resize
#: (|log area ratio|) between matched blobs, so identical references do not make any jitter
#: significant.
_SHIFT_FLOOR, _RESIZE_FLOOR = 0.006, 0.06


def blob_layout_viz(ctx: ItemContext, args: BlobLayoutArgs) -> Observation:
    """Evidence = 0.9 * max of four terms, each against the references' own variation:
    count = ramp(d / (1 + spread), 0, 1), d = distance of the query's blob count from the
    references' median beyond their median absolute deviation (spread); layout = ramp(u_q - u_ref,
    0, 3), u = blobs left unmatched against the best reference; shift and resize =
    ramp(query's largest / references' typical, 1.5, 3) of the largest move and size change of a
    matched blob. Reference values are medians over references matched to the other references."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    box = None if region.whole else region.norm
    n = min(ctx.n_references, MAX_LAYOUT_REFS)
    ref_blobs_all = [ctx.reference_file_cached(i, "blobs", lambda i=i: find_blobs(ctx.reference_aligned(i), min_region_area(query.shape), ctx.lab(i)))
                     for i in range(n)]
    ref_blobs = [_in_box(b, box) for b in ref_blobs_all]
    q_blobs = _in_box(find_blobs(query, min_region_area(query.shape), ctx.lab()), box)
    counts = [len(b) for b in ref_blobs]

    def best_match(blobs: list[dict], candidates: list[int]) -> tuple[int, dict]:
        scored = [(i, match_blobs(blobs, ref_blobs[i])) for i in candidates]
        return min(scored, key=lambda t: (len(t[1]["extra"]) + len(t[1]["missing"]), t[1]["shift"], t[0]))

    best, match = best_match(q_blobs, list(range(n)))
    own = [best_match(ref_blobs[j], [i for i in range(n) if i != j])[1] for j in range(min(n, 4))] if n >= 2 else []
    u_q = len(match["extra"]) + len(match["missing"])
    typical, spread, outside, count_term = count_deviation(len(q_blobs), counts)
    terms = {"count": count_term, "layout": 0.0, "shift": 0.0, "resize": 0.0}
    u_ref = shift_ref = resize_ref = 0.0
    if own:
        u_ref = float(np.median([len(m["extra"]) + len(m["missing"]) for m in own]))
        shift_ref = max(float(np.median([m["shift"] for m in own])), _SHIFT_FLOOR)
        resize_ref = max(float(np.median([m["resize"] for m in own])), _RESIZE_FLOOR)
        terms["layout"] = ramp(u_q - u_ref, 0.0, 3.0)
        terms["shift"] = ramp(match["shift"] / shift_ref, 1.5, 3.0)
        terms["resize"] = ramp(match["resize"] / resize_ref, 1.5, 3.0)
    evidence = 0.9 * max(terms.values())
    strongest = max(terms, key=terms.get)

    # The main finding: an extra blob, else a missing one (where it should be), else the most
    # moved or resized blob, whichever term is strongest.
    finding = None
    if strongest in ("count", "layout") and match["extra"]:
        finding = max((q_blobs[i] for i in match["extra"]), key=lambda b: b["area"])["px"]
    elif strongest in ("count", "layout") and match["missing"]:
        finding = max((ref_blobs[best][j] for j in match["missing"]), key=lambda b: b["area"])["px"]
    elif strongest == "shift" and match["shift_pair"] is not None:
        finding = q_blobs[match["shift_pair"][0]]["px"]
    elif strongest == "resize" and match["resize_pair"] is not None:
        finding = q_blobs[match["resize_pair"][0]]["px"]
    if evidence == 0.0:
        finding = None
    view_q = query.copy()
    view_r = ctx.reference_aligned(best).copy()
    for qi, rj in match["pairs"]:
        draw_box(view_q, q_blobs[qi]["px"], GREEN)
        draw_box(view_r, ref_blobs[best][rj]["px"], GREEN)
    for qi in match["extra"]:
        draw_box(view_q, q_blobs[qi]["px"], RED, "extra")
    for rj in match["missing"]:
        draw_box(view_q, ref_blobs[best][rj]["px"], YELLOW, "missing")
        draw_box(view_r, ref_blobs[best][rj]["px"], YELLOW)
    if finding is not None and strongest in ("shift", "resize"):
        draw_box(view_q, finding, RED, "moved" if strongest == "shift" else "resized")
    if box is not None:
        draw_box(view_q, region.px, CYAN)
    h = min(320, query.shape[0] * 2)
    panel = hstack([captioned(view_q, f"query: {len(q_blobs)} blobs", height=h),
                    captioned(view_r, f"ref {best}: {len(ref_blobs[best])} blobs", height=h)])
    scope = "" if box is None else f" with centres in {list(region.norm)}"
    side = "DIFFERENT from the references' usual count" if outside else "as usual"
    text = (f"Blobs{scope}: query {len(q_blobs)}, references {', '.join(map(str, counts))} (median "
            f"{typical:g}; {side}). Against its best reference (ref {best}): {len(match['pairs'])} paired, "
            f"{len(match['extra'])} extra in the query, {len(match['missing'])} missing from it "
            f"(references among themselves: {u_ref:g} unmatched). ")
    if match["extra"]:
        text += "Extra: " + "; ".join(f"bbox {px_to_norm(q_blobs[i]['px'], query.shape)} area "
                                      f"{100 * q_blobs[i]['area']:.2f}%" for i in match["extra"][:3]) + ". "
    if match["missing"]:
        text += "Missing (where the reference has one): " + "; ".join(
            f"bbox {px_to_norm(ref_blobs[best][j]['px'], query.shape)}" for j in match["missing"][:3]) + ". "
    if match["pairs"] and own:
        text += (f"Largest move of a matched blob {100 * match['shift']:.1f}% of the diagonal "
                 f"({match['shift'] / shift_ref:.1f}x the references'); largest size change "
                 f"{100 * (math.exp(match['resize']) - 1):.0f}% ({match['resize'] / resize_ref:.1f}x the references').")
    data = {"evidence": evidence, "bbox": px_to_norm(finding, query.shape) if finding else None,
            "found": bool(evidence >= 0.3), "count": len(q_blobs), "reference_counts": counts,
            "reference_count_median": typical, "count_outside": outside, "extra": len(match["extra"]),
            "missing": len(match["missing"]), "unmatched": u_q, "reference_unmatched": u_ref,
            "largest_shift": match["shift"], "reference_shift": shift_ref, "largest_resize": match["resize"],
            "reference_resize": resize_ref, "best_reference": best, "terms": terms, "strongest": strongest}
    image = image_payload("blob_layout_viz", panel, "blobs of the query and its best-matching reference: "
                          "green matched, red extra/moved/resized, yellow missing")
    return Observation("blob_layout_viz", with_notes(text, notes), [image], data)


# ------------------------------------------------------------------------- change_heatmap_viz

class ChangeHeatmapArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; report the change in this "
                                     "region, or omit for the whole image")


def change_heatmap_viz(ctx: ItemContext, args: ChangeHeatmapArgs) -> Observation:
    """Evidence = ramp(peak excess, 1.5, 4) of the strongest changed region (inside the bbox when
    given): excess = illumination-normalised, registered Delta E between the "before" reference
    and the query, divided by the references' own leave-one-out Delta E (with several references)
    or by a fixed 12 Delta E (a single "before" image); 0 when nothing exceeds 1.5x."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    # Lightness and colour cast are matched: a season or an exposure is not a change.
    analysis = analyse_diff(ctx, n_refs=1, illumination=(0, 1, 2))
    before = analysis.ref_indices[0]
    valid = analysis.valid.copy()
    if not region.whole:
        inside = np.zeros(valid.shape, bool)
        inside[region.slices()] = True
        valid &= inside
    regions, mask = excess_regions(analysis.excess, REGION_EXCESS, min_area=min_region_area(query.shape),
                                   max_regions=5, valid=valid)
    for r in regions:
        r["bbox"] = px_to_norm(r["px"], query.shape)
    change_fraction = float(mask[valid].mean()) if valid.any() else 0.0
    evidence = ramp(regions[0]["peak"], REGION_EXCESS, FULL_EXCESS) if regions else 0.0
    heat = overlay_heatmap(query, np.clip((analysis.excess - 0.5) / 3.5, 0, 1), TOOL_OVERLAY_ALPHA,
                           proportional=True)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(heat, contours, -1, YELLOW, max(1, round(max(query.shape[:2]) / 256)))
    for k, r in enumerate(regions[:3]):
        draw_box(heat, r["px"], RED if k == 0 else CYAN, f"#{k + 1}")
    if not region.whole:
        draw_box(heat, region.px, GREEN)
    h = min(256, query.shape[0] * 2)
    panel = hstack([captioned(analysis.warped[before], f"before (ref {before}, registered)", height=h),
                    captioned(query, "after (query)", height=h),
                    captioned(heat, "change beyond normal", height=h)])
    reg = analysis.registrations[0]
    yardstick = ("the references' own differences" if analysis.calibrated
                 else f"a fixed dE {UNCALIBRATED_BASELINE_DE:g} (single before image)")
    scope = "the whole image" if region.whole else f"region {list(region.norm)}"
    text = (f"Change map of {scope}: before = reference {before}, registered (shift {reg['shift_px']} px, "
            f"{reg['angle_deg']} deg) and matched in lightness and colour cast; change measured against "
            f"{yardstick}. Changed area: {100 * change_fraction:.2f}% of {scope}. ")
    if regions:
        text += "Changed regions: " + "; ".join(
            f"#{k + 1} bbox {r['bbox']} area {100 * r['area'] / mask.size:.2f}% peak {r['peak']:.1f}x"
            for k, r in enumerate(regions[:3])) + "."
    else:
        text += "No region changed beyond normal variation."
    data = {"evidence": evidence, "bbox": regions[0]["bbox"] if regions else None, "found": bool(regions),
            "change_fraction": change_fraction, "before_reference": before, "calibrated": analysis.calibrated,
            "regions": [{k: r[k] for k in ("bbox", "peak", "mean", "area")} for r in regions]}
    image = image_payload("change_heatmap_viz", panel, "before (registered reference), after (query), "
                          "and where the change exceeds normal variation")
    return Observation("change_heatmap_viz", with_notes(text, notes), [image], data,
                       mask=evidence_mask(analysis.excess, REGION_EXCESS, FULL_EXCESS, valid))


# --------------------------------------------------------------------------- fft_spectrum_viz

class FFTSpectrumArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; report the local spectral "
                                     "anomaly in this region, or omit for the whole image")


_RADIAL_BINS = 6
_ANGULAR_BINS = 6
#: Tile side for the local spectra, as a fraction of the image's longer side (>= 16 px).
_TILE_FRACTION = 1.0 / 8.0
TILE_BANK_REFS = 4
#: Tile excess at which evidence starts, and where it is full.
TILE_EVIDENCE = (1.0, 1.8)
#: A tile is unusual when its distance to the nearest reference tile exceeds this percentile of
#: the references' own leave-one-out tile distances.
_TILE_PERCENTILE = 99.0


def _tile_geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """(tile, stride) in px: tiles of about 1/8 of the longer side (a multiple of 8, >= 16, no
    larger than the shorter side), overlapping by half."""
    tile = max(16, int(round(max(shape[:2]) * _TILE_FRACTION / 8.0)) * 8)
    tile = min(tile, min(shape[:2]) // 2 * 2)
    return tile, tile // 2


def _pooling_matrix(tile: int) -> np.ndarray:
    """[tile * (tile // 2 + 1), bins]: averages an rfft2 magnitude into radial x angular bins
    (DC excluded), so a tile's spectrum becomes a short orientation/scale signature."""
    fy = np.fft.fftfreq(tile)[:, None]
    fx = np.fft.rfftfreq(tile)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2) / 0.5
    angle = np.mod(np.arctan2(fy, fx), np.pi) / np.pi  # orientation, mod 180 degrees
    r_bin = np.clip((radius * _RADIAL_BINS).astype(int), 0, _RADIAL_BINS - 1)
    a_bin = np.clip((angle * _ANGULAR_BINS).astype(int), 0, _ANGULAR_BINS - 1)
    index = (r_bin * _ANGULAR_BINS + a_bin).ravel()
    pool = np.zeros((index.size, _RADIAL_BINS * _ANGULAR_BINS), np.float32)
    pool[np.arange(index.size), index] = 1.0
    pool[0, :] = 0.0  # DC carries the tile's mean, not its texture
    return pool / np.maximum(pool.sum(axis=0, keepdims=True), 1.0)


def tile_spectra(gray: np.ndarray, tile: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Local spectral signatures: float32 [n_tiles, bins + 1] (log-magnitude pooled into radial x
    angular bins, plus log contrast) for tiles of ``tile`` px every ``stride`` px, and the grid."""
    windows = np.lib.stride_tricks.sliding_window_view(gray, (tile, tile))[::stride, ::stride]
    grid = windows.shape[:2]
    tiles = windows.reshape(-1, tile, tile).astype(np.float32)
    tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
    contrast = tiles.std(axis=(1, 2))
    hann = np.outer(np.hanning(tile), np.hanning(tile)).astype(np.float32)
    mag = np.abs(sfft.rfft2(tiles * hann, workers=-1)).reshape(tiles.shape[0], -1)
    pooled = np.log1p(mag @ _pooling_matrix(tile) * 10.0)
    features = np.concatenate([pooled, np.log(contrast + 0.01)[:, None]], axis=1)
    return features.astype(np.float32), grid


def tile_map(tile_values: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel map (H, W) of overlapping tile values (tiles 2 * stride px, every stride px): each
    stride x stride block gets the mean of the (up to 4) tiles covering it."""
    gh, gw = tile_values.shape
    padded = np.pad(tile_values, 1)
    counts = np.pad(np.ones_like(tile_values), 1)
    sums = padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:] + padded[1:, 1:]
    n = counts[:-1, :-1] + counts[1:, :-1] + counts[:-1, 1:] + counts[1:, 1:]
    blocks = (sums / np.maximum(n, 1.0)).astype(np.float32)  # (gh + 1, gw + 1) blocks
    full = np.repeat(np.repeat(blocks, stride, axis=0), stride, axis=1)
    h, w = shape
    out = np.zeros((h, w), np.float32)
    out[:min(h, full.shape[0]), :min(w, full.shape[1])] = full[:h, :w]
    return out


def _nearest(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    sq = (query ** 2).sum(1)[:, None] + (bank ** 2).sum(1)[None, :] - 2.0 * query @ bank.T
    return np.sqrt(np.maximum(sq.min(axis=1), 0.0))


def _tile_bank(ctx: ItemContext) -> dict:
    """Reference tiles (standardised) and the references' leave-one-out tile distance level."""
    shape = ctx.query.shape

    def compute() -> dict:
        tile, stride = _tile_geometry(shape)
        idx = list(range(min(TILE_BANK_REFS, ctx.n_references)))
        feats = [tile_spectra(ctx.gray(i), tile, stride)[0] for i in idx]
        allf = np.concatenate(feats)
        mean, std = allf.mean(axis=0), np.maximum(allf.std(axis=0), 1e-3)
        feats = [(f - mean) / std for f in feats]
        if len(idx) >= 2:
            loo = np.concatenate([_nearest(feats[j], np.concatenate([feats[i] for i in range(len(idx)) if i != j]))
                                  for j in range(len(idx))])
        else:  # one reference: its two halves (by tile order) against each other
            f = feats[0]
            half = len(f) // 2
            loo = np.concatenate([_nearest(f[:half], f[half:]), _nearest(f[half:], f[:half])])
        return {"tile": tile, "stride": stride, "mean": mean, "std": std, "bank": np.concatenate(feats),
                "level": max(float(np.percentile(loo, _TILE_PERCENTILE)), 1e-3)}

    return ctx.reference_cached("fft_tiles", compute, shape=shape)


#: Global spectra are computed on a copy with at most this many pixels a side.
SPECTRUM_SIDE = 256


def global_spectrum(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """(centred magnitude spectrum, scale): the 2-D FFT magnitude (float32) of a Hann-windowed,
    mean-removed grey copy with at most :data:`SPECTRUM_SIDE` px a side; ``scale`` = work-size
    pixels per copy pixel (periods are reported in work-size pixels)."""
    h, w = gray.shape
    scale = max(1.0, max(h, w) / SPECTRUM_SIDE)
    small = cv2.resize(gray, (max(8, round(w / scale)), max(8, round(h / scale))), interpolation=cv2.INTER_AREA)
    window = cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F)
    spectrum = sfft.fft2((small - small.mean()) * window, workers=-1)
    return np.abs(sfft.fftshift(spectrum)).astype(np.float32), scale


def _display_spectrum(magnitude: np.ndarray, side: int) -> np.ndarray:
    spec = cv2.resize(np.log1p(magnitude), (side, side), interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(spec, 1), np.percentile(spec, 99.9)
    return cv2.cvtColor(np.clip((spec - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def dominant_period(magnitude: np.ndarray, scale: float = 1.0) -> tuple[float, float, float]:
    """The strongest periodicity in a centred magnitude spectrum (see :func:`global_spectrum`):
    (period in work-size px, orientation of the wave vector in degrees, prominence = peak /
    median magnitude at that radius, in dB)."""
    h, w = magnitude.shape
    fy = (np.arange(h) - h // 2)[:, None] / h
    fx = (np.arange(w) - w // 2)[None, :] / w
    radius = np.sqrt(fx ** 2 + fy ** 2)
    usable = (radius > 3.0 / min(h, w)) & (radius < 0.45)
    py, px = np.unravel_index(int(np.argmax(np.where(usable, magnitude, 0.0))), magnitude.shape)
    r = radius[py, px]
    ring = usable & (np.abs(radius - r) < 1.0 / min(h, w))
    prominence = 20.0 * math.log10(max(float(magnitude[py, px]), 1e-9) / max(float(np.median(magnitude[ring])), 1e-9))
    orientation = math.degrees(math.atan2(-float(fy[py, 0]), float(fx[0, px]))) % 180.0
    return scale / max(r, 1e-6), orientation, prominence


def fft_spectrum_viz(ctx: ItemContext, args: FFTSpectrumArgs) -> Observation:
    """Evidence = ramp(e, 1.0, 1.8), e = the second-highest tile excess (inside the bbox when given;
    the second, so one odd tile is not enough): a tile's excess is its spectral signature's
    distance to the nearest reference tile divided by the 99th percentile of the references' own
    leave-one-out tile distances."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    bank = _tile_bank(ctx)
    tile, stride = bank["tile"], bank["stride"]
    feats, grid = tile_spectra(ctx.gray(), tile, stride)
    dist = _nearest((feats - bank["mean"]) / bank["std"], bank["bank"])
    tile_excess = (dist / bank["level"]).reshape(grid).astype(np.float32)
    excess = tile_map(tile_excess, stride, query.shape[:2])
    centres_y = np.arange(grid[0]) * stride + tile / 2.0
    centres_x = np.arange(grid[1]) * stride + tile / 2.0
    x0, y0, x1, y1 = region.px
    in_y = (centres_y >= y0) & (centres_y <= y1)
    in_x = (centres_x >= x0) & (centres_x <= x1)
    if not in_y.any() or not in_x.any():  # a box smaller than one tile: take the nearest tile
        in_y = np.abs(centres_y - (y0 + y1) / 2.0) == np.abs(centres_y - (y0 + y1) / 2.0).min()
        in_x = np.abs(centres_x - (x0 + x1) / 2.0) == np.abs(centres_x - (x0 + x1) / 2.0).min()
    scoped = np.sort(tile_excess[np.ix_(in_y, in_x)].ravel())[::-1]
    robust_peak = float(scoped[1] if scoped.size > 1 else scoped[0])
    evidence = ramp(robust_peak, *TILE_EVIDENCE)
    valid = np.zeros(query.shape[:2], bool)
    valid[region.slices()] = True
    regions, _ = excess_regions(excess, TILE_EVIDENCE[0], min_area=tile * tile // 2, max_regions=3, valid=valid)
    for r in regions:
        r["bbox"] = px_to_norm(r["px"], query.shape)

    best = ctx.closest_reference_index()
    q_spectrum = ctx.item_cached("spectrum", lambda: global_spectrum(ctx.gray()))
    r_spectrum = ctx.reference_file_cached(best, "spectrum", lambda: global_spectrum(ctx.gray(best)))
    q_period, r_period = dominant_period(*q_spectrum), dominant_period(*r_spectrum)
    heat = overlay_heatmap(query, np.clip((excess - 0.6) / 1.9, 0, 1), TOOL_OVERLAY_ALPHA, proportional=True)
    for k, r in enumerate(regions):
        draw_box(heat, r["px"], RED if k == 0 else CYAN, f"#{k + 1}")
    if not region.whole:
        draw_box(heat, region.px, GREEN)
    side = min(192, max(query.shape[:2]))
    panel = hstack([captioned(_display_spectrum(q_spectrum[0], side), "query spectrum"),
                    captioned(_display_spectrum(r_spectrum[0], side), f"ref {best} spectrum"),
                    captioned(heat, "local spectral anomaly", height=side)])
    period_change = q_period[2] - r_period[2]
    scope = "the whole image" if region.whole else f"region {list(region.norm)}"
    text = (f"Dominant periodicity: query period {q_period[0]:.1f} px at {q_period[1]:.0f} deg "
            f"(prominence {q_period[2]:.1f} dB); reference {best}: {r_period[0]:.1f} px at {r_period[1]:.0f} deg "
            f"({r_period[2]:.1f} dB). Local spectra ({tile} px tiles) of {scope} against the references' tiles: "
            f"strongest tiles {robust_peak:.2f}x the references' own 99th-percentile distance. ")
    if regions:
        text += "Unusual texture: " + "; ".join(f"#{k + 1} bbox {r['bbox']} peak {r['peak']:.1f}x"
                                               for k, r in enumerate(regions)) + "."
    else:
        text += "No area with an unusual local spectrum: the texture matches the references."
    data = {"evidence": evidence, "bbox": regions[0]["bbox"] if regions else None,
            "found": bool(robust_peak >= TILE_EVIDENCE[0]), "tile_excess_peak": robust_peak,
            "query_period_px": q_period[0], "query_orientation_deg": q_period[1],
            "query_prominence_db": q_period[2], "reference_period_px": r_period[0],
            "reference_prominence_db": r_period[2], "prominence_change_db": period_change,
            "tile_px": tile, "regions": [{k: r[k] for k in ("bbox", "peak", "mean")} for r in regions]}
    image = image_payload("fft_spectrum_viz", panel, "log-magnitude spectra of the query and the closest "
                          "reference, and where local spectra leave the references' range")
    return Observation("fft_spectrum_viz", with_notes(text, notes), [image], data)


# -------------------------------------------------------------------------------------- tools

def build_tools() -> list:
    return [
        make_tool("blob_layout_viz",
                  "Find the blobs (separate parts) of the query and the references: counts, sizes, and "
                  "which query blobs are extra or missing against the best-matching reference. For "
                  "counting/logical layouts and retail shelves.",
                  BlobLayoutArgs, blob_layout_viz, family=FAMILY,
                  specialty="blob count, sizes and layout of the query against the references",
                  applicability=Applicability(any_of=frozenset({"counting"}),
                                              note="logical/counting layouts, retail",
                                              instead="reference_profile")),
        make_tool("change_heatmap_viz",
                  "Bi-temporal change map between the reference ('before') and the query ('after'): "
                  "registered, lightness- and colour-normalised; changed area and regions.",
                  ChangeHeatmapArgs, change_heatmap_viz, family=FAMILY,
                  specialty="change map between the before reference and the query",
                  applicability=Applicability(any_of=frozenset({"bi_temporal", "aligned"}),
                                              note="remote-sensing change and other aligned pairs",
                                              instead="side_by_side_compare")),
        make_tool("fft_spectrum_viz",
                  "Log-magnitude Fourier spectra of the query and the closest reference, the dominant "
                  "periodicity, and a local spectral anomaly map (where the texture's frequency content "
                  "leaves the references' range). For textures, surfaces, fabrics.",
                  FFTSpectrumArgs, fft_spectrum_viz, family=FAMILY,
                  specialty="spectra, periodicity breaks and local spectral anomalies of textures",
                  applicability=Applicability(any_of=frozenset({"texture"}),
                                              note="textures, surfaces, fabrics",
                                              instead="side_by_side_compare")),
    ]
