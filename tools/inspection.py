"""Visual inspection tools: side-by-side comparison, zoom, and segmentation of the salient region.

Each tool shows the VLM pixels it could not resolve in the first message and measures the same
thing on the references, so that "different" is always relative to how much normal images
differ from each other in the same place.
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field

from anomalyclaw.experts.maps import overlay_heatmap

from .applicability import Applicability
from .difference import (MAP_FULL_LEVEL, MAP_REGION_LEVEL, REGION_EXCESS, UNCALIBRATED_BASELINE_DE,
                         analyse_diff, diff_illumination, expert_excess_map, min_region_area)
from .factory import make_tool
from .guard import ToolArgumentError, clamp_arg
from .item_context import ItemContext
from .observation import Observation, evidence_mask, image_payload, ramp, with_notes
from .regions import BBOX_DESCRIPTION, px_to_norm, resolve_bbox
from .statistics import (REGION_EVIDENCE, Z_EVIDENCE, compare_statistics, describe_statistic,
                         detail_statistics, region_distances, search_margin)
from .imageops import CYAN, GREEN, RED, YELLOW, captioned, draw_box, excess_regions, hstack, vstack

MAX_SHOWN_REFS = 4


# ----------------------------------------------------------------------- side_by_side_compare

class SideBySideArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; omit for the whole image")
    n_refs: int = Field(2, description="how many best-matching references to show, 1-4")


def side_by_side_compare(ctx: ItemContext, args: SideBySideArgs) -> Observation:
    """Evidence = ramp(excess, 1.2, 2.5): 0 when the query's region is within 1.2x the references'
    median leave-one-out difference there, 1 at 2.5x or more (see :func:`region_distances`)."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    n_show = int(clamp_arg(args, "n_refs", 1, min(MAX_SHOWN_REFS, ctx.n_references), notes))
    rd = region_distances(ctx, region.px)
    shown = rd["matches"][:n_show]
    excess = rd["excess"]
    calibrated = bool(np.isfinite(excess))
    evidence = ramp(excess, *REGION_EVIDENCE) if calibrated else None

    # Full views with boxes on top, the crops below.
    thumb_h = 240
    q_full = draw_box(query.copy(), region.px, RED)
    best = shown[0]
    r_full = draw_box(ctx.reference_aligned(best["reference"]).copy(), best["matched_px"], GREEN)
    top = hstack([captioned(q_full, "query", height=thumb_h),
                  captioned(r_full, f"reference {best['reference']}", height=thumb_h)])
    x0, y0, x1, y1 = region.px
    # Crops 200 px high, narrower when the box is wide, so the strip stays legible at 768 px.
    crop_h = max(24, min(200, round(240 * (y1 - y0) / (x1 - x0))))
    crops = [captioned(query[y0:y1, x0:x1], "query region", height=crop_h)]
    for m in shown:
        a0, b0, a1, b1 = m["matched_px"]
        crops.append(captioned(ctx.reference_aligned(m["reference"])[b0:b1, a0:a1],
                               f"ref {m['reference']} dE {m['distance']:.1f}", height=crop_h))
    panel = vstack([top, hstack(crops)])
    where = "the whole image" if region.whole else f"region {list(region.norm)}"
    place = "near the same place in" if search_margin(ctx) is not None else "anywhere in each of"
    text = (f"Compared {where} of the query with its best match {place} {len(rd['matches'])} "
            f"reference(s); showing {n_show}. Query region vs best reference: mean colour difference "
            f"dE {rd['query_distance']:.1f}. ")
    if calibrated:
        above = "above" if rd["query_distance"] > rd["reference_max"] else "within"
        text += (f"References differ from each other there by dE {rd['reference_median']:.1f} (median; "
                 f"max {rd['reference_max']:.1f}), so the query is {excess:.1f}x the normal difference, "
                 f"{above} the references' range.")
        verdict = ("unusual: the region differs more than normal images do" if excess >= REGION_EVIDENCE[0]
                   else "consistent with normal variation")
        text += f" Reading: {verdict}."
    else:
        text += "Only one reference: no normal difference to compare with; judge from the image."
    data = {"evidence": evidence, "bbox": list(region.norm), "found": bool(calibrated and excess >= REGION_EVIDENCE[0]),
            "region_excess": excess if calibrated else None, "query_distance": rd["query_distance"],
            "reference_distance_median": rd["reference_median"] if calibrated else None,
            "reference_distance_max": rd["reference_max"] if calibrated else None,
            "references": [{"reference": m["reference"], "distance": round(m["distance"], 3),
                            "matched_bbox": px_to_norm(m["matched_px"], query.shape)} for m in shown]}
    image = image_payload("side_by_side", panel, f"query {where} (red) next to the best-matching "
                          f"region of {n_show} reference(s) (green)")
    return Observation("side_by_side_compare", with_notes(text, notes), [image], data)


# -------------------------------------------------------------------------------- region_zoom

class RegionZoomArgs(BaseModel):
    bbox: list[float] = Field(..., description=BBOX_DESCRIPTION + "; the region to magnify")
    scale: float = Field(2.0, description="magnification, 1-6")


#: Longest side of a zoomed crop as shown (pixels); two crops side by side stay <= 768 px.
MAX_ZOOM_SIDE = 376


def region_zoom(ctx: ItemContext, args: RegionZoomArgs) -> Observation:
    """Evidence = ramp(max |z|, 2.5, 6) over the crop's detail statistics (darkest and brightest
    spot, strongest colour, contrast, edge density; see :func:`detail_statistics`) against the
    same statistics of the best-matching region in up to 6 references."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape, required=True)
    notes += region.notes
    scale = clamp_arg(args, "scale", 1.0, 6.0, notes)
    rd = region_distances(ctx, region.px)
    x0, y0, x1, y1 = region.px
    stats_q = detail_statistics(query[y0:y1, x0:x1])
    stats_r = []
    for m in rd["matches"]:
        a0, b0, a1, b1 = m["matched_px"]
        stats_r.append(detail_statistics(ctx.reference_aligned(m["reference"])[b0:b1, a0:a1]))
    stats = compare_statistics(stats_q, stats_r)
    max_z = max(abs(s["z"]) for s in stats.values())
    calibrated = len(stats_r) >= 2
    evidence = ramp(max_z, *Z_EVIDENCE) if calibrated else None

    # Crop the full-resolution query (the VLM already saw more than the work size).
    full = ctx.query_full
    fx0, fy0, fx1, fy1 = region.on(full.shape)
    crop = full[fy0:fy1, fx0:fx1]
    target = np.array(crop.shape[:2], float) * scale
    if target.max() > MAX_ZOOM_SIDE:
        shown_scale = scale * MAX_ZOOM_SIDE / target.max()
        notes.append(f"zoom limited to x{shown_scale:.1f} so the crop fits {MAX_ZOOM_SIDE} px")
    else:
        shown_scale = scale
    size = (max(1, round(crop.shape[1] * shown_scale)), max(1, round(crop.shape[0] * shown_scale)))
    zoomed = cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC if shown_scale > 1 else cv2.INTER_AREA)
    best = rd["matches"][0]
    ref_full = ctx.reference_full(best["reference"])
    bx0, by0, bx1, by1 = px_to_norm(best["matched_px"], query.shape)
    rx0, ry0 = int(bx0 * ref_full.shape[1]), int(by0 * ref_full.shape[0])
    ref_crop = ref_full[ry0:ry0 + crop.shape[0], rx0:rx0 + crop.shape[1]]
    ref_zoomed = cv2.resize(ref_crop, size, interpolation=cv2.INTER_CUBIC if shown_scale > 1 else cv2.INTER_AREA)
    panel = hstack([captioned(zoomed, f"query x{shown_scale:.1f}"),
                    captioned(ref_zoomed, f"reference {best['reference']} x{shown_scale:.1f}")])

    ranked = sorted(stats.items(), key=lambda kv: -abs(kv[1]["z"]))
    text = (f"Zoom x{shown_scale:.1f} on {list(region.norm)} ({crop.shape[1]}x{crop.shape[0]} px of the "
            f"{full.shape[1]}x{full.shape[0]} px query), next to the best-matching region of reference "
            f"{best['reference']}. ")
    if calibrated:
        text += f"Against the same region in {len(stats_r)} references: " + "; ".join(
            describe_statistic(k, v) for k, v in ranked[:3]) + "."
        verdict = ("the crop's details are outside normal" if max_z >= Z_EVIDENCE[0] else
                   "the crop's statistics are within normal variation")
        text += f" Reading: {verdict} (largest |z| {max_z:.1f})."
    else:
        text += "Only one reference: no spread to compare statistics with; judge from the image."
    data = {"evidence": evidence, "bbox": list(region.norm), "found": bool(calibrated and max_z >= Z_EVIDENCE[0]),
            "max_abs_z": max_z, "stats": stats, "zoom": round(shown_scale, 3),
            "crop_px": [int(crop.shape[1]), int(crop.shape[0])], "reference": best["reference"]}
    image = image_payload("region_zoom", panel, f"query region {list(region.norm)} magnified "
                          f"x{shown_scale:.1f}, and the same region of reference {best['reference']}")
    return Observation("region_zoom", with_notes(text, notes), [image], data)


# ---------------------------------------------------------------------------- segment_anomaly

class SegmentAnomalyArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; restrict the search to it, "
                                     "or omit for the whole image")
    source: Literal["auto", "expert", "diff"] = Field(
        "auto", description="'expert': the frozen expert's anomaly map; 'diff': registered difference "
        "to the references (aligned domains only); 'auto': diff on aligned domains, else expert")
    expert: Literal["anomaly_vfm", "subspace_ad"] = Field("anomaly_vfm", description="expert for source 'expert'")


def segment_anomaly(ctx: ItemContext, args: SegmentAnomalyArgs) -> Observation:
    """Evidence = ramp(peak excess of the strongest region, 1.5, 4) for the diff source (excess =
    difference / the references' own difference there) and ramp(peak, 1, 2) for the expert
    source (the map on the references' scale, see :func:`expert_excess_map`); 0 when no region."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    aligned = "aligned" in ctx.traits
    source = args.source
    if source == "auto":
        source = "diff" if aligned else "expert"
    if source == "diff" and not aligned:
        raise ToolArgumentError(f"source 'diff' needs an aligned domain; {ctx.item.domain_code} is not "
                                "aligned: use source 'expert' (or 'auto')")
    if source == "diff":
        analysis = analyse_diff(ctx, illumination=diff_illumination(ctx))
        excess, valid = analysis.excess, analysis.valid
        cut, lo, hi = REGION_EXCESS, 1.5, 4.0
        what = ("registered difference to the closest references, relative to the references' own "
                "differences" if analysis.calibrated else
                f"registered difference to the single reference, relative to dE {UNCALIBRATED_BASELINE_DE:g}")
    else:
        excess, _ = expert_excess_map(ctx, args.expert)
        valid = np.ones(excess.shape, bool)
        cut, lo, hi = MAP_REGION_LEVEL, MAP_REGION_LEVEL, MAP_FULL_LEVEL
        what = (f"{args.expert} anomaly map on the references' scale (0 = an ordinary normal patch, "
                "1 = the most unusual normal reference)")
    if not region.whole:
        inside = np.zeros(excess.shape, bool)
        inside[region.slices()] = True
        valid = valid & inside
    regions, mask = excess_regions(excess, cut, min_area=min_region_area(query.shape), max_regions=5,
                                   valid=valid)
    area_frac = float(mask.sum()) / float(mask.size)
    peak = regions[0]["peak"] if regions else float(excess[valid].max()) if valid.any() else 0.0
    evidence = ramp(peak, lo, hi) if regions else 0.0
    for r in regions:
        r["bbox"] = px_to_norm(r["px"], query.shape)
        r["area_frac"] = round(r["area"] / mask.size, 5)

    overlay = overlay_heatmap(query, np.clip((excess - 0.5) / max(hi - 0.5, 1e-6), 0, 1) * valid, 0.35,
                              proportional=True)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, YELLOW, max(1, round(max(query.shape[:2]) / 256)))
    for k, r in enumerate(regions):
        draw_box(overlay, r["px"], RED if k == 0 else CYAN, f"#{k + 1}")
    if not region.whole:
        draw_box(overlay, region.px, GREEN)
    panel = hstack([captioned(query, "query", height=min(384, query.shape[0] * 2)),
                    captioned(overlay, f"segmented ({source})", height=min(384, query.shape[0] * 2))])

    scope = "the whole image" if region.whole else f"region {list(region.norm)}"
    if regions:
        listing = "; ".join(f"#{k + 1} bbox {r['bbox']} area {100 * r['area_frac']:.2f}% peak {r['peak']:.1f}x"
                            for k, r in enumerate(regions[:3]))
        text = (f"Segmented {scope} from the {what}: {len(regions)} region(s) above {cut:g}x normal, "
                f"covering {100 * area_frac:.2f}% of the image. {listing}.")
    else:
        text = (f"Segmented {scope} from the {what}: nothing above {cut:g}x normal (highest {peak:.2f}x); "
                "no salient region.")
    data = {"evidence": evidence, "bbox": regions[0]["bbox"] if regions else None, "found": bool(regions),
            "source": source, "n_regions": len(regions), "area_frac": round(area_frac, 5),
            "peak_excess": round(peak, 3),
            "regions": [{k: r[k] for k in ("bbox", "area_frac", "peak", "mean")} for r in regions]}
    image = image_payload("segment_anomaly", panel, f"salient regions of the query ({source} map), "
                          "contours in yellow, strongest region in red")
    return Observation("segment_anomaly", with_notes(text, notes), [image], data,
                       mask=evidence_mask(excess, lo, hi, valid))


# -------------------------------------------------------------------------------------- tools

FAMILY = "visual inspection"


def build_tools() -> list:
    return [
        make_tool("side_by_side_compare",
                  "Show a query region next to the best-matching region of the closest references "
                  "(boxes drawn) and measure how much more it differs than references differ among "
                  "themselves. Use it to check whether a suspicious feature also appears in normal images.",
                  SideBySideArgs, side_by_side_compare, family=FAMILY,
                  specialty="query region next to the same region of the closest references",
                  applicability=Applicability(requires=frozenset({"references>=1"}),
                                              note="any item with references")),
        make_tool("region_zoom",
                  "Magnify a region of the query (full resolution) next to the same region of the "
                  "closest reference, with its brightness/contrast/colour/edge statistics against the "
                  "references. Use it for small details: scratches, specks, fine cracks.",
                  RegionZoomArgs, region_zoom, family=FAMILY,
                  specialty="magnified crop of a bbox and the same crop of the closest reference",
                  applicability=Applicability(requires=frozenset({"references>=1"}), note="any item")),
        make_tool("segment_anomaly",
                  "Segment the salient region (from the frozen expert's anomaly map, or from the "
                  "registered difference on aligned domains): area, number of regions, boxes, overlay. "
                  "Use it to locate and size a candidate anomaly.",
                  SegmentAnomalyArgs, segment_anomaly, family=FAMILY,
                  specialty="mask, contours, area and count of the salient region",
                  applicability=Applicability(requires=frozenset({"references>=1"}),
                                              note="any item; best with an expert map or an aligned domain")),
    ]
