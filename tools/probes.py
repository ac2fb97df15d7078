"""Frozen expert probes: an expert's image score read against the references, and its heatmap.

The experts (``anomalyclaw.experts``) are fitted once per reference set through the context's
pool; every reference is also scored leave-one-out, so a raw score becomes a rank among normal
images ("above all references", "within the references' range") that a VLM can read without
knowing the expert's scale.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from anomalyclaw.experts.maps import suggest_bbox

from anomalyclaw.experts.maps import overlay_heatmap

from .applicability import Applicability
from .difference import MAP_FULL_LEVEL, MAP_REGION_LEVEL, expert_excess_map, min_region_area
from .factory import make_tool
from .item_context import ItemContext
from .observation import TOOL_OVERLAY_ALPHA, Observation, image_payload, ramp, with_notes
from .regions import BBOX_DESCRIPTION, px_to_norm, resolve_bbox
from .imageops import CYAN, GREEN, RED, captioned, draw_box, excess_regions, hstack

FAMILY = "frozen expert probes"
SCALE_WORDS = "references' scale (0 = an ordinary normal patch, 1 = the most unusual normal reference)"
#: Released-cache names of the experts (``experts.released.ReleasedScoreCache``).
_RELEASED_NAMES = {"anomaly_vfm": "anomalyvfm", "subspace_ad": "subspacead"}
def score_verdict(score: float, reference_scores: np.ndarray) -> tuple[str, float, float]:
    """(verdict words, margin, evidence) for an image score among the references' leave-one-out
    scores. margin = (score - highest reference) / spread, spread = the references' standard
    deviation (floored at 5% of their mean); evidence = ramp(margin, -1, 3): 0 one spread below
    the highest reference, 0.25 at it, 1 three spreads above it."""
    refs = np.asarray(reference_scores, float)
    top = float(refs.max())
    spread = max(float(refs.std(ddof=1)) if refs.size > 1 else 0.0, 0.05 * abs(float(refs.mean())), 1e-9)
    margin = (score - top) / spread
    if score > top:
        words = f"above all references ({score / top:.2f}x the highest)" if top > 0 else "above all references"
    elif score >= float(np.quantile(refs, 0.75)):
        words = "in the upper part of the references' range"
    elif score < float(refs.min()):
        words = "below all references"
    else:
        words = "within the references' range"
    return words, margin, ramp(margin, -1.0, 3.0)


# --------------------------------------------------------------------- score probes (2 tools)

class ExpertScoreArgs(BaseModel):
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; also report the expert's map "
                                     "inside this region, or omit")


def _score_probe(name: str, label: str):
    def probe(ctx: ItemContext, args: ExpertScoreArgs) -> Observation:
        """Evidence: without a bbox, from the image score's margin over the references (see
        :func:`score_verdict`); with a bbox, ramp(peak of the map in the bbox, 1, 2) on the
        references' scale (see :func:`expert_excess_map`)."""
        notes: list[str] = []
        query = ctx.query
        region = resolve_bbox(args.bbox, query.shape)
        notes += region.notes
        result = ctx.expert_result(name)
        refs = np.asarray(result.reference_scores, float)
        words, margin, image_evidence = score_verdict(float(result.score), refs)
        excess, _ = expert_excess_map(ctx, name)
        regions, _ = excess_regions(excess, MAP_REGION_LEVEL, min_area=min_region_area(query.shape), max_regions=3)
        for r in regions:
            r["bbox"] = px_to_norm(r["px"], query.shape)
        text = (f"{label}: image score {result.score:.4g}, {words}; rank {100 * result.rank:.0f}th percentile "
                f"among the {refs.size} reference(s)' leave-one-out scores (range {refs.min():.4g}-{refs.max():.4g}). ")
        data = {"score": float(result.score), "rank": float(result.rank), "threshold": float(result.threshold),
                "reference_scores": [round(float(s), 6) for s in refs], "margin": margin, "verdict": words,
                "regions": [{k: r[k] for k in ("bbox", "peak", "mean")} for r in regions]}
        if region.whole:
            evidence = image_evidence
            data["bbox"] = regions[0]["bbox"] if regions else None
        else:
            inside = excess[region.slices()]
            peak, mean = float(inside.max()), float(inside.mean())
            evidence = ramp(peak, MAP_REGION_LEVEL, MAP_FULL_LEVEL)
            data.update(bbox=list(region.norm), region_peak=peak, region_mean=mean)
            text += (f"In bbox {list(region.norm)} its map peaks at {peak:.2f} on the {SCALE_WORDS} "
                     f"({'beyond' if peak > MAP_REGION_LEVEL else 'within'} normal). ")
        if regions:
            text += "Hotspots beyond the most unusual reference: " + "; ".join(
                f"bbox {r['bbox']} peak {r['peak']:.2f}" for r in regions) + "."
        else:
            text += "No hotspot beyond the most unusual reference."
        released = _released(ctx, name)
        if released is not None:
            data["released"] = released
            text += f" Released {label} cache for this item: score {released.get('score')}."
        data.update(evidence=evidence, found=bool(result.score > result.threshold or regions))
        return Observation(f"{name}_score", with_notes(text, notes), [], data)

    return probe


def _released(ctx: ItemContext, name: str) -> dict | None:
    """The released per-item score of this expert when the runner passed a cache: scores only,
    and only when the cached row has the item's split and domain code (the cache predates the
    current ids). The item's label is never consulted, so availability cannot leak it."""
    if ctx.score_cache is None:
        return None
    row = ctx.score_cache.get(ctx.item.item_id, _RELEASED_NAMES[name])
    if not row or row.get("split") not in (None, ctx.item.split) or row.get("domain_code") != ctx.item.domain_code:
        return None
    return {k: row[k] for k in ("score", "score_norm", "threshold") if row.get(k) is not None}


# ----------------------------------------------------------------------------- expert_heatmap

class ExpertHeatmapArgs(BaseModel):
    expert: Literal["anomaly_vfm", "subspace_ad"] = Field("anomaly_vfm", description="which expert's map")
    bbox: list[float] | None = Field(None, description=BBOX_DESCRIPTION + "; outline this region on the "
                                     "overlay and report the map in it, or omit")


def expert_heatmap(ctx: ItemContext, args: ExpertHeatmapArgs) -> Observation:
    """Evidence = ramp(peak of the map, 1, 2) over the whole image, or inside the bbox when given,
    on the references' scale (0 = an ordinary normal patch, 1 = the most unusual reference)."""
    notes: list[str] = []
    query = ctx.query
    region = resolve_bbox(args.bbox, query.shape)
    notes += region.notes
    excess, (typical, threshold) = expert_excess_map(ctx, args.expert)
    scoped = excess if region.whole else excess[region.slices()]
    peak = float(scoped.max())
    evidence = ramp(peak, MAP_REGION_LEVEL, MAP_FULL_LEVEL)
    # A fixed scale (0 to the full-evidence level) keeps normal images cool on the overlay.
    map01 = np.clip(excess / MAP_FULL_LEVEL, 0.0, 1.0)
    suggested = suggest_bbox(map01, min_peak=MAP_REGION_LEVEL / MAP_FULL_LEVEL)
    overlay = overlay_heatmap(query, map01, TOOL_OVERLAY_ALPHA, proportional=True)
    if suggested is not None:
        box_px = tuple(int(round(v * s)) for v, s in zip(suggested, (query.shape[1], query.shape[0]) * 2))
        draw_box(overlay, box_px, RED, "suggested")
    if not region.whole:
        draw_box(overlay, region.px, GREEN)
    regions, _ = excess_regions(excess, MAP_REGION_LEVEL, min_area=min_region_area(query.shape), max_regions=5)
    for r in regions[1:3]:
        draw_box(overlay, r["px"], CYAN)
    h = min(320, query.shape[0] * 2)
    panel = hstack([captioned(query, "query", height=h),
                    captioned(overlay, f"{args.expert} anomaly map", height=h)])
    scope = "the image" if region.whole else f"bbox {list(region.norm)}"
    text = (f"{args.expert} anomaly map: peak in {scope} {peak:.2f} on the {SCALE_WORDS} "
            f"({'beyond' if peak > MAP_REGION_LEVEL else 'within'} normal); {len(regions)} hotspot(s) beyond 1. ")
    text += (f"Suggested bbox: {suggested}." if suggested is not None else
             "No hotspot stands out: no bbox suggested.")
    data = {"evidence": evidence, "bbox": suggested if region.whole else list(region.norm),
            "suggested_bbox": suggested, "found": bool(suggested is not None), "peak_excess": peak,
            "n_hotspots": len(regions), "expert": args.expert, "normal_patch_score": typical,
            "threshold": threshold}
    image = image_payload("expert_heatmap", panel, f"{args.expert} anomaly map over the query (red: "
                          f"suggested bbox); blue = an ordinary normal patch, red = {MAP_FULL_LEVEL:g} on the "
                          "references' scale")
    return Observation("expert_heatmap", with_notes(text, notes), [image], data)


# -------------------------------------------------------------------------------------- tools

def build_tools() -> list:
    any_item = Applicability(requires=frozenset({"references>=1"}), note="any item with references")
    return [
        make_tool("subspace_ad_score",
                  "Score the query with the PCA-subspace expert (residual of patch features off the "
                  "references' subspace): score, its rank among the references' own scores, hotspots.",
                  ExpertScoreArgs, _score_probe("subspace_ad", "subspace_ad (PCA residual)"), family=FAMILY,
                  specialty="PCA-subspace residual score and its rank among the references",
                  applicability=any_item),
        make_tool("anomaly_vfm_score",
                  "Score the query with the patch nearest-neighbour expert (distance of each patch to "
                  "the nearest reference patch): score, percentile among the references, hotspots.",
                  ExpertScoreArgs, _score_probe("anomaly_vfm", "anomaly_vfm (patch kNN)"), family=FAMILY,
                  specialty="patch nearest-neighbour score and its percentile among the references",
                  applicability=any_item),
        make_tool("expert_heatmap",
                  "Overlay a frozen expert's patch anomaly map on the query and suggest the bbox of "
                  "its hottest region.",
                  ExpertHeatmapArgs, expert_heatmap, family=FAMILY,
                  specialty="expert anomaly-map overlay and a suggested bbox",
                  applicability=any_item),
    ]
