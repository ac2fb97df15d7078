"""Region measurements calibrated by the references' own variation: how far a query region is
from its best match in each reference (against the references' leave-one-out distances), and
region statistics (brightness, contrast, colour, edges, counts) as z-scores among the references."""
from __future__ import annotations

import cv2
import numpy as np

from .imageops import RegionSearch, box_delta_e, mean_delta_e, to_gray, to_lab
from .item_context import ItemContext
from .observation import ramp

#: References a region is matched in (the closest by global similarity); bounds the cost.
MAX_CANDIDATE_REFS = 6
#: Region distance excess (query / references' median) at which side-by-side evidence starts, and
#: where it is full.
REGION_EVIDENCE = (1.2, 2.5)
#: Search window for region matching on aligned domains, as a fraction of the image side.
ALIGNED_SEARCH_MARGIN = 0.08


def search_margin(ctx: ItemContext) -> float | None:
    """Where a region is looked for in a reference: near the same place on aligned domains
    (a fraction of the side), anywhere otherwise (None)."""
    return ALIGNED_SEARCH_MARGIN if "aligned" in ctx.traits else None


def region_distances(ctx: ItemContext, box: tuple[int, int, int, int]) -> dict:
    """How far the query's ``box`` is from its best match in each candidate reference, and how far
    each reference's same box is from its best match in the other references (leave-one-out).

    Distances are mean Delta E over the box after matching (search window: +-8% of the side on
    aligned domains, the whole reference otherwise). ``excess`` = query's smallest distance /
    the references' median leave-one-out distance (floored at 1 Delta E).
    """
    margin = search_margin(ctx)
    candidates = ctx.closest_references(min(MAX_CANDIDATE_REFS, ctx.n_references))
    search = RegionSearch(ctx.query.shape, box, search_margin=margin)
    # Each image's template and search window, resized once for every pair it is in.
    windows = {i: search.window_of(ctx.gray(i)) for i in candidates}
    # The query's box alone is converted (the references' whole images are cached for the run).
    query_template = search.template_of_box(ctx.gray_box(box))
    query_lab = ctx.lab_box(box)
    matches = []
    for i in candidates:
        matched = search.match(query_template, windows[i])
        u0, v0, u1, v1 = matched
        matches.append({"reference": i, "matched_px": matched,
                        "distance": mean_delta_e(query_lab, ctx.lab(i)[v0:v1, u0:u1])})
    matches.sort(key=lambda m: m["distance"])
    loo = []
    if len(candidates) >= 2:
        for j in candidates:
            template = search.template(ctx.gray(j))
            loo.append(min(box_delta_e(ctx.lab(j), box, ctx.lab(i), search.match(template, windows[i]))
                           for i in candidates if i != j))
    query_distance = matches[0]["distance"]
    if loo:
        ref_median, ref_max = float(np.median(loo)), float(np.max(loo))
        excess = query_distance / max(ref_median, 1.0)
    else:
        ref_median = ref_max = float("nan")
        excess = float("nan")
    return {"matches": matches, "query_distance": query_distance, "reference_median": ref_median,
            "reference_max": ref_max, "reference_distances": loo, "excess": excess}


def crop_statistics(image: np.ndarray, lab: np.ndarray | None = None) -> dict[str, float]:
    """Mean appearance of an RGB crop: brightness (mean L*), contrast (std of L*), colourfulness
    (mean chroma), hue axes (mean a*, b*; Lab units) and edge density (fraction of pixels whose
    Sobel gradient magnitude exceeds 0.25 on [0, 1] grey). ``lab``: the crop in Lab when the
    caller has it."""
    lab = to_lab(image) if lab is None else lab
    return {"brightness": float(lab[:, :, 0].mean()), "contrast": float(lab[:, :, 0].std()),
            "chroma": float(np.hypot(lab[:, :, 1], lab[:, :, 2]).mean()),
            "red_green": float(lab[:, :, 1].mean()), "yellow_blue": float(lab[:, :, 2].mean()),
            "edge_density": _edge_density(to_gray(image))}


def detail_statistics(image: np.ndarray) -> dict[str, float]:
    """Small-detail appearance of an RGB crop, what a zoom reveals: darkest and brightest spots
    (1st and 99th percentile of L*), strongest colour (99th percentile of chroma), contrast (std
    of L*) and edge density. A speck, a scratch or a stain moves these even when it is too
    small to move the crop's mean."""
    lab = to_lab(image)
    lightness = lab[:, :, 0]
    chroma = np.hypot(lab[:, :, 1], lab[:, :, 2])
    return {"darkest": float(np.percentile(lightness, 1)), "brightest": float(np.percentile(lightness, 99)),
            "strongest_colour": float(np.percentile(chroma, 99)), "contrast": float(lightness.std()),
            "edge_density": _edge_density(to_gray(image))}


def _edge_density(gray: np.ndarray) -> float:
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    return float((np.hypot(gx, gy) > 0.25).mean())


def count_deviation(count: int, reference_counts: list[int]) -> tuple[float, float, float, float]:
    """(typical, spread, outside, term) for a count among the references' counts: the median, the
    median absolute deviation, how far ``count`` lies beyond typical +- spread, and the evidence
    term ramp(outside / (1 + spread), 0, 1). Medians, so one odd reference does not widen what
    counts as normal."""
    typical = float(np.median(reference_counts))
    spread = float(np.median(np.abs(np.asarray(reference_counts, float) - typical)))
    outside = max(0.0, abs(count - typical) - spread)
    return typical, spread, outside, ramp(outside / (1.0 + spread), 0.0, 1.0)


#: Standard-deviation floors of the statistics (their units), so that a statistic the references
#: happen to share exactly does not make a tiny difference infinitely significant.
STAT_FLOORS = {"brightness": 2.0, "contrast": 1.5, "chroma": 2.0, "red_green": 1.5, "yellow_blue": 1.5,
               "edge_density": 0.02, "darkest": 3.0, "brightest": 3.0, "strongest_colour": 3.0,
               "foreground_fraction": 0.02, "parts": 0.5}
STAT_WORDS = {"brightness": "brightness (mean L*, 0-100)", "contrast": "contrast (std of L*)",
              "chroma": "colourfulness (mean chroma)", "red_green": "red-green tint (mean a*)",
              "yellow_blue": "yellow-blue tint (mean b*)", "edge_density": "edge density (fraction of edge pixels)",
              "darkest": "darkest spot (1st percentile L*)", "brightest": "brightest spot (99th percentile L*)",
              "strongest_colour": "strongest colour (99th percentile chroma)",
              "foreground_fraction": "object area (fraction of image)", "parts": "separate parts"}
#: z-scores (|z|) at which statistics start to count as evidence, and count fully.
Z_EVIDENCE = (2.5, 6.0)


def compare_statistics(query_stats: dict[str, float], reference_stats: list[dict[str, float]],
                       floors: dict[str, float] = STAT_FLOORS) -> dict[str, dict]:
    """Per statistic: the query's value, the references' mean/std/min/max and the z-score
    (query - mean) / max(std, floor)."""
    out = {}
    for name, value in query_stats.items():
        refs = np.array([r[name] for r in reference_stats], float)
        std = float(refs.std(ddof=1)) if refs.size > 1 else 0.0
        z = (value - float(refs.mean())) / max(std, floors.get(name, 1e-6))
        out[name] = {"query": round(value, 4), "ref_mean": round(float(refs.mean()), 4),
                     "ref_std": round(std, 4), "ref_min": round(float(refs.min()), 4),
                     "ref_max": round(float(refs.max()), 4), "z": round(float(z), 2)}
    return out


def describe_statistic(name: str, s: dict, words: dict[str, str] = STAT_WORDS) -> str:
    side = ("above all references" if s["query"] > s["ref_max"] else
            "below all references" if s["query"] < s["ref_min"] else "within the references' range")
    return (f"{words.get(name, name)} {s['query']:.3g} vs references {s['ref_mean']:.3g}+-{s['ref_std']:.2g} "
            f"(z={s['z']:+.1f}, {side})")
