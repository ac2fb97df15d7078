"""Reference understanding tools: retrieval, the profile of normal variation, registered
difference, and rotation-tolerant alignment.

They answer "what does normal look like here, and how far is the query from it?", always
measuring the query with the same yardstick the references are measured with among themselves.
"""
from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, Field

from anomalyclaw.experts.maps import overlay_heatmap

from .applicability import Applicability
from .difference import (DIFF_REFS, FULL_EXCESS, REGION_EXCESS, UNCALIBRATED_BASELINE_DE, analyse_diff,
                         diff_illumination, diff_view, min_region_area)
from .factory import make_tool
from .guard import clamp_arg
from .item_context import ItemContext
from .observation import TOOL_OVERLAY_ALPHA, Observation, evidence_mask, image_payload, ramp, with_notes
from .regions import BBOX_DESCRIPTION, px_to_norm, resolve_bbox
from .statistics import (Z_EVIDENCE, compare_statistics, count_deviation, crop_statistics,
                         describe_statistic, region_distances)
from .imageops import (CYAN, GREEN, RED, blur, captioned, delta_e, draw_box, excess_regions, find_blobs,
                       foreground_mask, hstack, match_illumination, register, to_gray, to_lab, to_smooth_lab,
                       warp_onto)

FAMILY = "reference understanding"


# ------------------------------------------------------------------------ reference_retriever

class RetrieverArgs(BaseModel):
    k: int = Field(3, description="how many nearest references to return, 1-8")


MAX_RETRIEVED = 8
#: References embedded for retrieval (bounds the one-time cost per reference set).
MAX_RETRIEVAL_POOL = 32


def _reference_embeddings(ctx: ItemContext, backbone) -> np.ndarray:
    n = min(ctx.n_references, MAX_RETRIEVAL_POOL)

    def compute() -> np.ndarray:
        if hasattr(backbone, "embed_features") and n == ctx.n_references:
            # Pooled patch features: each image's come from the run's per-image cache.
            return np.asarray(backbone.embed_features(ctx.reference_features(backbone)), np.float32)
        return np.asarray(backbone.embed([ctx.reference(i) for i in range(n)]), np.float32)

    return ctx.reference_cached(f"embed:{getattr(backbone, 'name', type(backbone).__name__)}", compute)


def _query_embedding(ctx: ItemContext, backbone) -> np.ndarray:
    if hasattr(backbone, "embed_features"):
        return np.asarray(backbone.embed_features(ctx.query_features(backbone)[None]), np.float32)[0]
    return np.asarray(backbone.embed([ctx.query]), np.float32)[0]


def reference_retriever(ctx: ItemContext, args: RetrieverArgs) -> Observation:
    """Evidence = ramp(ratio, 1.5, 4), ratio = (1 - query's nearest similarity) / (median over
    references of 1 - their nearest similarity to another reference): a query farther from every
    reference than references are from each other is unusual as a whole."""
    notes: list[str] = []
    backbone = ctx.get_backbone()
    refs = _reference_embeddings(ctx, backbone)
    k = int(clamp_arg(args, "k", 1, min(MAX_RETRIEVED, refs.shape[0]), notes))
    q = _query_embedding(ctx, backbone)
    sims = refs @ q
    order = np.argsort(-sims, kind="stable")[:k]
    own = refs @ refs.T
    np.fill_diagonal(own, -np.inf)
    ref_nn = own.max(axis=1)
    q_nn = float(sims[order[0]])
    ref_dist = float(np.median(1.0 - ref_nn))
    ratio = (1.0 - q_nn) / max(ref_dist, 1e-4)
    evidence = ramp(ratio, 1.5, 4.0)
    name = getattr(backbone, "name", "backbone")
    panels = [captioned(ctx.query, "query", height=192)]
    for i in order:
        panels.append(captioned(ctx.reference(int(i)), f"ref {int(i)} sim {sims[i]:.3f}", height=192))
    listing = ", ".join(f"ref {int(i)} ({sims[i]:.3f})" for i in order)
    reading = ("farther from the pool than any reference is from the others" if q_nn < float(ref_nn.min())
               else "as close to the pool as the references are to each other")
    text = (f"Nearest references by {name} embedding (cosine similarity): {listing}. The query's nearest "
            f"similarity {q_nn:.3f} vs the references' own nearest-neighbour similarity "
            f"{float(np.median(ref_nn)):.3f} (median; lowest {float(ref_nn.min()):.3f}): its distance is "
            f"{ratio:.1f}x the normal one, so it is {reading}.")
    data = {"evidence": evidence, "bbox": None, "found": bool(ratio >= 1.5), "distance_ratio": ratio,
            "nearest_similarity": q_nn, "reference_nn_similarity_median": float(np.median(ref_nn)),
            "reference_nn_similarity_min": float(ref_nn.min()),
            "retrieved": [{"reference": int(i), "similarity": round(float(sims[i]), 4)} for i in order],
            "pool_size": int(refs.shape[0]), "backbone": name}
    image = image_payload("reference_retriever", hstack(panels),
                          f"the query and its {k} nearest references by {name} embedding")
    return Observation("reference_retriever", with_notes(text, notes), [image], data)


# -------------------------------------------------------------------------- reference_profile

class ProfileArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; profile only this region "
                                     "(matched in each reference), or omit for the whole image")


MAX_PROFILE_REFS = 10
#: More parts than this is a texture or clutter, not a countable layout.
MAX_COUNTABLE_PARTS = 60


def whole_image_profile(image: np.ndarray, lab: np.ndarray) -> dict[str, float]:
    """:func:`crop_statistics` of the whole image (``lab``: its lightly blurred Lab) plus its
    object area (fraction of the image in foreground blobs) and part count (blobs, as
    ``blob_layout_viz`` finds them)."""
    stats = crop_statistics(image, lab)
    blobs = find_blobs(image, min_region_area(image.shape), lab)
    stats["foreground_fraction"] = float(sum(b["area"] for b in blobs))
    stats["parts"] = float(len(blobs))
    return stats


def _variability(ctx: ItemContext, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel mean and std of the references' lightness (float32 H x W, L* units) and an
    overlay of the std on the mean reference (RGB uint8)."""
    lights = np.stack([ctx.lab(i)[:, :, 0] for i in range(n)])
    mean_l, std_l = lights.mean(axis=0), lights.std(axis=0)
    mean_rgb = np.mean([ctx.reference_aligned(i).astype(np.float32) for i in range(n)], axis=0).astype(np.uint8)
    return mean_l, std_l, overlay_heatmap(mean_rgb, std_l / max(float(std_l.max()), 1e-3), TOOL_OVERLAY_ALPHA,
                                          proportional=True)


def reference_profile(ctx: ItemContext, args: ProfileArgs) -> Observation:
    """Evidence = max(ramp(max |z|, 2.5, 6), 0.8 * count term): z-scores of the query's statistics
    among the references (std floored per statistic), and, on counting domains only, the part
    count's deviation from the references' median count (see :func:`count_deviation`)."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    n = min(ctx.n_references, MAX_PROFILE_REFS)
    if region.whole:
        q_stats = whole_image_profile(query, ctx.lab())
        r_stats = [ctx.reference_file_cached(i, "profile", lambda i=i: whole_image_profile(ctx.reference_aligned(i),
                                                                                            ctx.lab(i)))
                   for i in range(n)]
    else:
        x0, y0, x1, y1 = region.px
        q_stats = crop_statistics(query[y0:y1, x0:x1])
        r_stats = []
        for m in region_distances(ctx, region.px)["matches"]:
            a0, b0, a1, b1 = m["matched_px"]
            r_stats.append(crop_statistics(ctx.reference_aligned(m["reference"])[b0:b1, a0:a1]))
    stats = compare_statistics(q_stats, r_stats)
    count_evidence = 0.0
    parts = stats.get("parts")
    countable = parts is not None and parts["ref_max"] <= MAX_COUNTABLE_PARTS
    if parts is not None:
        if countable:
            counts = [int(r["parts"]) for r in r_stats]
            # Only where the card says normal is a fixed set of parts: cells or stones vary freely.
            if "counting" in ctx.traits:
                count_evidence = 0.8 * count_deviation(int(parts["query"]), counts)[3]
        else:
            del stats["parts"]  # a texture's speckles are not parts
    z_stats = {k: v for k, v in stats.items() if k != "parts"}
    max_z = max(abs(s["z"]) for s in z_stats.values())
    evidence = max(ramp(max_z, *Z_EVIDENCE), count_evidence)

    # What normal varies in: a per-pixel map on aligned domains, a montage otherwise.
    images = []
    aligned = "aligned" in ctx.traits
    if aligned and region.whole:
        mean_l, std_l, var_view = ctx.reference_cached("variability", lambda: _variability(ctx, n), shape=query.shape)
        deviation = np.abs(ctx.lab()[:, :, 0] - mean_l) / np.maximum(std_l, 3.0)
        dev_view = overlay_heatmap(query, np.clip(deviation / 6.0, 0, 1), TOOL_OVERLAY_ALPHA,
                                   proportional=True)
        h = min(320, query.shape[0] * 2)
        images.append(image_payload("reference_profile", hstack([
            captioned(var_view, "where references vary (std of L*)", height=h),
            captioned(dev_view, "query deviation (z vs refs)", height=h)]),
            "left: how much the references vary per pixel; right: where the query leaves that range"))
        dev_note = (f" Per-pixel: the query's lightness leaves the references' range by up to "
                    f"{float(np.percentile(deviation, 99.9)):.1f} std (99.9th percentile).")
    else:
        cols = [captioned(query, "query", height=150)]
        cols += [captioned(ctx.reference(i), f"ref {i}", height=150) for i in range(min(n, 5))]
        images.append(image_payload("reference_profile", hstack(cols),
                                    f"the query and {min(n, 5)} of the {ctx.n_references} references"))
        dev_note = ""
    ranked = sorted(z_stats.items(), key=lambda kv: -abs(kv[1]["z"]))
    scope = "the whole image" if region.whole else f"region {list(region.norm)} (matched in each reference)"
    text = (f"Profile of normal over {len(r_stats)} references for {scope}. Most deviant: "
            + "; ".join(describe_statistic(k, v) for k, v in ranked[:3]) + ".")
    if parts is not None and countable:
        text += (f" Separate parts: query {int(parts['query'])}, references {', '.join(map(str, counts))}"
                 + (" (DIFFERENT from their usual count)." if count_evidence > 0 else "."))
    text += dev_note
    data = {"evidence": evidence, "bbox": None if region.whole else list(region.norm),
            "found": bool(max_z >= Z_EVIDENCE[0] or count_evidence > 0), "max_abs_z": max_z,
            "count_evidence": count_evidence, "stats": stats, "n_references_used": len(r_stats)}
    return Observation("reference_profile", with_notes(text, notes), images, data)


# --------------------------------------------------------------------------------- image_diff

class ImageDiffArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; report this region's "
                                     "difference, or omit for the whole image")
    n_refs: int = Field(DIFF_REFS, description="closest references to difference against (per-pixel minimum), 1-4")


def image_diff(ctx: ItemContext, args: ImageDiffArgs) -> Observation:
    """Evidence = ramp(peak excess, 1.5, 4) of the strongest region (inside the bbox when given),
    where excess = registered Delta E / the references' own leave-one-out Delta E at that pixel;
    0 when no region exceeds 1.5x. With a single reference the yardstick is a fixed 12 Delta E.
    Lightness is matched (globally and its smooth shading); on bi-temporal items colour cast too."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    n_refs = int(clamp_arg(args, "n_refs", 1, min(4, ctx.n_references), notes))
    analysis = analyse_diff(ctx, n_refs=n_refs, illumination=diff_illumination(ctx))
    valid = analysis.valid.copy()
    if not region.whole:
        inside = np.zeros(valid.shape, bool)
        inside[region.slices()] = True
        valid &= inside
    regions, _ = excess_regions(analysis.excess, REGION_EXCESS, min_area=min_region_area(query.shape),
                                max_regions=5, valid=valid)
    for r in regions:
        r["bbox"] = px_to_norm(r["px"], query.shape)
        x0, y0, x1, y1 = r["px"]
        r["mean_delta_e"] = float(analysis.diff[y0:y1, x0:x1].mean())
    evidence = ramp(regions[0]["peak"], REGION_EXCESS, FULL_EXCESS) if regions else 0.0
    sl = region.slices()
    region_excess = float(analysis.diff[sl].mean() / analysis.baseline[sl].mean())

    best = analysis.ref_indices[0]
    heat = overlay_heatmap(query, np.clip((analysis.excess - 0.5) / 3.5, 0, 1), TOOL_OVERLAY_ALPHA,
                           proportional=True)
    for k, r in enumerate(regions[:3]):
        draw_box(heat, r["px"], RED if k == 0 else CYAN, f"#{k + 1}")
    if not region.whole:
        draw_box(heat, region.px, GREEN)
    h = min(256, query.shape[0] * 2)
    panel = hstack([captioned(query, "query", height=h),
                    captioned(analysis.warped[best], f"ref {best} registered", height=h),
                    captioned(heat, "difference vs normal", height=h)])
    reg = analysis.registrations[0]
    yardstick = ("the references' own differences there" if analysis.calibrated
                 else f"a fixed dE {UNCALIBRATED_BASELINE_DE:g} (one reference: no calibration)")
    matched = "lightness and colour cast" if len(diff_illumination(ctx)) == 3 else "lightness"
    text = (f"Registered difference (ECC; {matched} matched) to the {len(analysis.ref_indices)} closest "
            f"reference(s) {analysis.ref_indices}, per-pixel minimum; closest ref {best} shifted "
            f"{reg['shift_px']} px, rotated {reg['angle_deg']} deg. Compared with {yardstick}. ")
    if not region.whole:
        text += f"In bbox {list(region.norm)}: mean difference {region_excess:.1f}x normal. "
    if regions:
        text += "Top regions: " + "; ".join(
            f"#{k + 1} bbox {r['bbox']} peak {r['peak']:.1f}x normal, mean dE {r['mean_delta_e']:.1f}, "
            f"area {100 * r['area'] / query.shape[0] / query.shape[1]:.2f}%" for k, r in enumerate(regions[:3])) + "."
    else:
        peak = float(analysis.excess[valid].max()) if valid.any() else 0.0
        text += f"No region exceeds {REGION_EXCESS:g}x normal (highest {peak:.2f}x): the difference is normal variation."
    data = {"evidence": evidence, "bbox": regions[0]["bbox"] if regions else None, "found": bool(regions),
            "region_excess": region_excess, "calibrated": analysis.calibrated,
            "regions": [{k: r[k] for k in ("bbox", "peak", "mean", "mean_delta_e", "area")} for r in regions],
            "registrations": analysis.registrations}
    image = image_payload("image_diff", panel, "query, closest reference registered onto it, and where the "
                          "difference exceeds the references' own (boxes: top regions)")
    return Observation("image_diff", with_notes(text, notes), [image], data,
                       mask=evidence_mask(analysis.excess, REGION_EXCESS, FULL_EXCESS, valid))


# ------------------------------------------------------------------------------- rotate_align

class RotateAlignArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; report the residual in this "
                                     "region, or omit for the whole image")
    n_refs: int = Field(3, description="closest references to try, 1-4")


#: Angular resolution of the polar rotation search: one row per degree.
_ANGLES = 360
#: Residual level of the references among themselves: this percentile of each blurred map.
_RESIDUAL_PERCENTILE = 99.5
ROTATE_REGION_EXCESS = 1.2
#: ... and the residual excess of full evidence (its scalar evidence and its mask ramp up to it).
ROTATE_FULL_EXCESS = 3.0


def _object_centre(image: np.ndarray) -> tuple[float, float]:
    fg = foreground_mask(image)
    if fg.sum() < 0.01 * fg.size:
        return image.shape[1] / 2.0, image.shape[0] / 2.0
    ys, xs = np.nonzero(fg)
    return float(xs.mean()), float(ys.mean())


def _ring_normalised_polar(image: np.ndarray, centre: tuple[float, float], radius: float,
                           inner: float = 0.0) -> np.ndarray:
    """float32 [360, R]: ``image`` around ``centre`` in polar coordinates (one row per degree),
    rings inside ``inner`` (fraction of the radius) dropped, each ring zero-mean and unit-norm so
    that every ring votes equally in the circular correlation, whatever its contrast."""
    polar = cv2.warpPolar(image, (max(16, int(radius)), _ANGLES), centre, radius,
                          cv2.WARP_POLAR_LINEAR | cv2.WARP_FILL_OUTLIERS | cv2.INTER_LINEAR)
    polar = polar[:, int(inner * polar.shape[1]):]
    polar = polar - polar.mean(axis=0, keepdims=True)
    return polar / np.maximum(np.linalg.norm(polar, axis=0, keepdims=True), 1e-6)


def _angle_peaks(fixed_polar: np.ndarray, moving_polar: np.ndarray, n: int, period: int = _ANGLES) -> list[int]:
    """The ``n`` best rotation angles (degrees, strongest first, >= 10 degrees apart) by circular
    cross-correlation along the angle axis."""
    spectrum = np.fft.fft(fixed_polar, axis=0) * np.conj(np.fft.fft(moving_polar, axis=0))
    corr = np.real(np.fft.ifft(spectrum.sum(axis=1)))[:period]
    peaks: list[int] = []
    for shift in np.argsort(-corr):
        if all(min(abs(shift - p), period - abs(shift - p)) >= 10 for p in peaks):
            peaks.append(int(shift))
        if len(peaks) == n:
            break
    return peaks


def _spectrum(gray: np.ndarray) -> np.ndarray:
    """Centred log-magnitude spectrum of a Hann-windowed grey image: translation-invariant, and
    it rotates with the image (the Fourier-Mellin idea)."""
    window = cv2.createHanningWindow((gray.shape[1], gray.shape[0]), cv2.CV_32F)
    return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(gray * window)))).astype(np.float32)


#: Side of the copies on which rotation candidates are compared (pixels).
_CANDIDATE_SIDE = 96


def rotation_features(image: np.ndarray) -> dict:
    """What the rotation search needs from one image (computed once per image): object centre,
    polar signature about it, polar signature of the spectrum, and a small Lab copy."""
    h, w = image.shape[:2]
    gray = to_gray(image)
    centre = _object_centre(image)
    radius = 0.5 * min(h, w)
    scale = _CANDIDATE_SIDE / max(h, w)
    small = cv2.resize(image, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    return {"centre": centre, "scale": scale, "small_lab": to_lab(small),
            "polar": _ring_normalised_polar(gray, centre, radius),
            "spectrum_polar": _ring_normalised_polar(_spectrum(gray), (w / 2.0, h / 2.0), radius, inner=0.1)}


def rotation_candidates(moving: dict, fixed: dict) -> list[np.ndarray]:
    """Fixed->moving 2x3 matrices (full-size pixels) for plausible rotations, best first.

    Angles come from the polar correlation about the object centres (2 peaks), the
    Fourier-Mellin spectrum correlation (2 peaks, mod 180 so both halves) and no rotation; each
    rotates about the fixed object's centre and brings the object centres together. They are
    ranked by the mean Delta E they leave on ~96 px copies (near-symmetric parts correlate well at
    several angles, but only the right one makes the asymmetric details vanish).
    """
    angles = _angle_peaks(fixed["polar"], moving["polar"], 2)
    fm = _angle_peaks(fixed["spectrum_polar"], moving["spectrum_polar"], 2, period=_ANGLES // 2)
    angles += fm + [a + 180 for a in fm] + [0]
    c_f, c_m, scale = fixed["centre"], moving["centre"], fixed["scale"]
    scored = []
    for angle in dict.fromkeys(a % 360 for a in angles):
        matrix = cv2.getRotationMatrix2D(c_f, float(angle), 1.0).astype(np.float32)
        matrix[:, 2] += np.float32([c_m[0] - c_f[0], c_m[1] - c_f[1]])
        small_matrix = matrix.copy()
        small_matrix[:, 2] *= scale
        warped, valid = warp_onto(moving["small_lab"], small_matrix, fixed["small_lab"].shape[:2])
        if valid.sum() < 0.25 * valid.size:
            continue
        scored.append((float(delta_e(warped, fixed["small_lab"])[valid].mean()), matrix))
    scored.sort(key=lambda t: t[0])
    return [m for _, m in scored] or [np.float32([[1, 0, 0], [0, 1, 0]])]


def rotate_aligned_residual(moving: np.ndarray, fixed: np.ndarray, fixed_lab: np.ndarray,
                            moving_features: dict, fixed_features: dict) -> dict:
    """Rotate ``moving`` onto ``fixed``: the best :func:`rotation_candidates` refined by euclidean
    ECC (on a 128 px copy). Returns the blurred Delta E residual (H, W), the valid mask, the
    angle, the ECC correlation, the warped image and the mean residual."""
    init = rotation_candidates(moving_features, fixed_features)[0]
    reg = register(moving, fixed, motion="euclidean", init=init, max_side=128)
    moving_lab = match_illumination(to_smooth_lab(reg.warped), fixed_lab, reg.valid)
    residual = blur(delta_e(moving_lab, fixed_lab), max(1.0, max(fixed.shape[:2]) / 256))
    residual[~reg.valid] = 0.0
    mean = float(residual[reg.valid].mean()) if reg.valid.any() else float("inf")
    return {"residual": residual, "valid": reg.valid, "angle_deg": reg.angle_deg,
            "correlation": reg.correlation, "warped": reg.warped, "mean": mean}


def _features(ctx: ItemContext, index: int | None) -> dict:
    """Rotation features of the query (None) or a reference, on its :func:`diff_view` copy."""
    if index is None:
        return ctx.item_cached("rotation_features", lambda: rotation_features(diff_view(ctx, None)[0]))
    return ctx.reference_file_cached(index, "rotation_features", lambda: rotation_features(diff_view(ctx, index)[0]))


def _residual_level(ctx: ItemContext) -> float | None:
    """The references' own residual after rotate-aligning each to its best other reference:
    the median over references of each one's 99.5th-percentile residual (Delta E; the median
    so that one failed alignment does not inflate it). None with fewer than 2 references."""
    if ctx.n_references < 2:
        return None

    def compute() -> float:
        idx = list(range(min(4, ctx.n_references)))
        levels = []
        for j in idx:
            fixed, fixed_lab = diff_view(ctx, j)
            best = min((rotate_aligned_residual(diff_view(ctx, i)[0], fixed, fixed_lab,
                                                _features(ctx, i), _features(ctx, j))
                        for i in idx if i != j), key=lambda r: r["mean"])
            levels.append(float(np.percentile(best["residual"][best["valid"]], _RESIDUAL_PERCENTILE)))
        return max(float(np.median(levels)), 4.0)

    return ctx.reference_cached("rotate_residual_level", compute, shape=ctx.query.shape)


def rotate_align(ctx: ItemContext, args: RotateAlignArgs) -> Observation:
    """Evidence = ramp(peak excess, 1.2, 3) of the strongest residual region, where excess =
    residual Delta E / the references' own residual level (their 99.5th percentile after the same
    alignment among themselves); 0 when no region exceeds 1.2x."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    n_refs = int(clamp_arg(args, "n_refs", 1, min(4, ctx.n_references), notes))
    # Work on the <= 320 px copies the difference maps use; maps are scaled back at the end.
    small, small_lab = diff_view(ctx, None)
    tried = []
    for i in ctx.closest_references(n_refs):
        res = rotate_aligned_residual(diff_view(ctx, i)[0], small, small_lab, _features(ctx, i), _features(ctx, None))
        res["reference"] = i
        tried.append(res)
    best = min(tried, key=lambda r: r["mean"])
    level = _residual_level(ctx)
    calibrated = level is not None
    level = level if calibrated else UNCALIBRATED_BASELINE_DE
    size = (query.shape[1], query.shape[0])
    excess = cv2.resize(best["residual"] / level, size, interpolation=cv2.INTER_LINEAR)
    best_valid = cv2.resize(best["valid"].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    valid = best_valid.copy()
    if not region.whole:
        inside = np.zeros(valid.shape, bool)
        inside[region.slices()] = True
        valid &= inside
    regions, _ = excess_regions(excess, ROTATE_REGION_EXCESS, min_area=min_region_area(query.shape),
                                max_regions=5, valid=valid)
    for r in regions:
        r["bbox"] = px_to_norm(r["px"], query.shape)
    evidence = ramp(regions[0]["peak"], ROTATE_REGION_EXCESS, ROTATE_FULL_EXCESS) if regions else 0.0
    heat = overlay_heatmap(query, np.clip((excess - 0.5) / 2.5, 0, 1) * best_valid, TOOL_OVERLAY_ALPHA,
                           proportional=True)
    for k, r in enumerate(regions[:3]):
        draw_box(heat, r["px"], RED if k == 0 else CYAN, f"#{k + 1}")
    if not region.whole:
        draw_box(heat, region.px, GREEN)
    h = min(256, query.shape[0] * 2)
    panel = hstack([captioned(query, "query", height=h),
                    captioned(cv2.resize(best["warped"], size), f"ref {best['reference']} rotated "
                              f"{best['angle_deg']:.0f} deg", height=h),
                    captioned(heat, "residual vs normal", height=h)])
    text = (f"Rotation-tolerant alignment (polar and spectrum correlation + ECC) against {len(tried)} reference(s): "
            f"reference {best['reference']} rotated by {best['angle_deg']:.1f} deg fits best (ECC "
            f"{best['correlation']:.2f}), mean residual dE {best['mean']:.1f}; references aligned among "
            f"themselves leave residuals up to dE {level:.1f}" + ("" if calibrated else " (fixed: one reference)")
            + ". ")
    if regions:
        text += "Residual regions beyond normal: " + "; ".join(
            f"#{k + 1} bbox {r['bbox']} peak {r['peak']:.1f}x" for k, r in enumerate(regions[:3])) + "."
    else:
        text += "No residual region beyond the references' own level: the object matches a rotated reference."
    data = {"evidence": evidence, "bbox": regions[0]["bbox"] if regions else None, "found": bool(regions),
            "angle_deg": round(best["angle_deg"], 2), "reference": best["reference"],
            "correlation": round(best["correlation"], 4), "mean_residual": round(best["mean"], 3),
            "residual_level": round(level, 3), "calibrated": calibrated,
            "regions": [{k: r[k] for k in ("bbox", "peak", "mean", "area")} for r in regions]}
    image = image_payload("rotate_align", panel, "query, best reference rotated onto it, residual beyond "
                          "the references' own level")
    return Observation("rotate_align", with_notes(text, notes), [image], data,
                       mask=evidence_mask(excess, ROTATE_REGION_EXCESS, ROTATE_FULL_EXCESS, valid))


# -------------------------------------------------------------------------------------- tools

def build_tools() -> list:
    return [
        make_tool("reference_retriever",
                  "Return the k references nearest to the query by image embedding, as images with "
                  "similarities, and whether the query is farther from the pool than references are "
                  "from each other. Use it to pick the most comparable normal images.",
                  RetrieverArgs, reference_retriever, family=FAMILY,
                  specialty="k nearest normal references by embedding, as images with similarities",
                  applicability=Applicability(requires=frozenset({"references>=2"}),
                                              excludes=frozenset({"bi_temporal"}),
                                              note="domains with a pool of several references",
                                              instead="side_by_side_compare")),
        make_tool("reference_profile",
                  "Describe what normal varies in across the references (brightness, contrast, colour, "
                  "edges, object area, part count, and a per-pixel variability map on aligned domains) and "
                  "where the query falls (z-scores). Use it to learn whether a feature is normal variation.",
                  ProfileArgs, reference_profile, family=FAMILY,
                  specialty="what normal varies in across references, and the query's z-scores",
                  applicability=Applicability(requires=frozenset({"references>=2"}),
                                              note="any item with at least 2 references",
                                              instead="side_by_side_compare")),
        make_tool("image_diff",
                  "Registered absolute difference between the query and its closest references, "
                  "relative to how much references differ among themselves: heatmap and top regions. "
                  "Aligned domains only.",
                  ImageDiffArgs, image_diff, family=FAMILY,
                  specialty="registered difference to the closest references, heatmap, top regions",
                  applicability=Applicability(requires=frozenset({"aligned"}),
                                              note="aligned domains only (fixed pose, bi-temporal pairs)",
                                              instead="side_by_side_compare")),
        make_tool("rotate_align",
                  "Rotate the closest references onto the query (polar correlation + ECC) and show the "
                  "residual difference beyond the references' own. For rigid objects at arbitrary rotation.",
                  RotateAlignArgs, rotate_align, family=FAMILY,
                  specialty="rotation-tolerant alignment to the references and residual difference",
                  applicability=Applicability(any_of=frozenset({"rotating", "object"}),
                                              excludes=frozenset({"medical", "aerial", "road", "texture",
                                                                  "bi_temporal"}),
                                              note="rigid objects that rotate; not medical, aerial, road or texture",
                                              instead="side_by_side_compare")),
    ]
