"""The pipeline's last step: where the anomaly is, from what the run found.

Gathers the inputs of :mod:`anomalyclaw.graph.localization`'s rule from a finished run (the
default expert's map, the candidates' final verdicts and boxes, the segmenting tools' evidence
masks, the direct branch's bbox, the fused score), applies it, and puts the result in state as
plain data: the confirmed and refuted boxes, and the agent's and the expert's maps as 16-bit
greyscale PNG bytes (the runner writes them to ``OUT/maps`` and keeps only their paths).
"""
from __future__ import annotations

import math
import time
from typing import Any

import cv2
import numpy as np
from langgraph.runtime import Runtime

from anomalyclaw.experts.pool import DEFAULT_EXPERT
from anomalyclaw.threads import to_compute_thread
from anomalyclaw.tools.difference import expert_excess_map, expert_map_at
from anomalyclaw.tools.item_context import ItemContext
from anomalyclaw.tools.observation import decode_mask

from .context import RunContext, arun_context
from .localization import (DEFAULT_RULE, WHOLE_IMAGE, LocalizationInputs, LocalizationRule, Region, expert_map,
                           fuse_map, map_shape, valid_bbox)
from .state import PipelineState

#: Full scale of the 16-bit map files: a pixel's map value is its code / MAP_SCALE.
MAP_SCALE = 65535


def encode_map(map01: np.ndarray) -> bytes:
    """A [0, 1] map as a 16-bit greyscale PNG (65536 levels: pixel rankings survive, which
    pixel AUROC and AUPRO depend on; 8 bits would tie most of a map)."""
    scaled = np.array(map01, dtype=np.float32)
    if not np.isfinite(scaled).all():  # NaN as 0; infinities are clipped to the ends below
        np.nan_to_num(scaled, copy=False)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= MAP_SCALE
    codes = np.rint(scaled).astype(np.uint16)
    # Stored, not deflated (zlib level 0, no filter): a map's low byte is noise that deflate
    # barely shrinks. Measured on 200 maps of `anomalyclaw bench`'s 512 px items (256 px maps,
    # one thread): 0.23 ms and 128.5 KB per map against 1.28 ms and 93.3 KB at level 1 with the
    # Sub filter and run-length matching (the previous setting), two maps per item: 2 ms of an
    # item's ~45 for 70 KB more on disk.
    ok, buf = cv2.imencode(".png", codes, [cv2.IMWRITE_PNG_COMPRESSION, 0,
                                           cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE])
    if not ok:
        raise ValueError(f"could not encode a map of shape {codes.shape}")
    return buf.tobytes()


def decode_map(data: bytes) -> np.ndarray:
    """The inverse of :func:`encode_map` (an 8-bit grey PNG is read on the same [0, 1] scale):
    float32 (H, W). Raises ValueError for bytes that are not a greyscale PNG."""
    codes = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if codes is None or codes.ndim != 2:
        raise ValueError("not a greyscale PNG map")
    full = 255.0 if codes.dtype == np.uint8 else float(MAP_SCALE)
    return (codes.astype(np.float32) / full).astype(np.float32)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _box(bbox: Any) -> list[float]:
    return [round(float(v), 4) for v in bbox]


def gather(state: dict[str, Any], ctx: ItemContext) -> tuple[LocalizationInputs, dict[str, Any]]:
    """The rule's inputs from a finished run's state, and the boxes as a record keeps them:
    ``{"boxes": [confirmed: {"bbox", "score", "candidate", "tool"}], "refuted": [{"bbox",
    "candidate", "tool"}], "direct_bbox", "map_shape"}``.

    A confirmed candidate's box is its own bbox, or (a candidate about the whole image) the main
    region of the observation that confirmed it; its score is that observation's ``evidence``
    (the tool's calibrated strength), else the item's fused score. A refuted candidate without a
    bbox refutes the whole image.
    """
    shape = map_shape(ctx.query.shape)
    excess, _ = expert_excess_map(ctx, DEFAULT_EXPERT, shape)
    observations = list(state.get("observations") or [])
    rows = [h for h in state.get("history") or [] if isinstance(h, dict) and h.get("stage") == "refute"]
    # Each refute turn answers the observation made just before it: the k-th refute row is about
    # the k-th observation.
    deciding: dict[str, dict[str, Any]] = {}
    for k, row in enumerate(rows):
        obs = observations[k] if k < len(observations) else None
        for verdict in row.get("verdicts") or []:
            if isinstance(verdict, dict) and obs is not None:
                deciding[str(verdict.get("id"))] = obs
    item_score = _number(state.get("anomaly_score"))
    regions: list[Region] = []
    confirmed: list[dict[str, Any]] = []
    refuted: list[dict[str, Any]] = []
    for cand in state.get("candidates") or []:
        if not isinstance(cand, dict) or cand.get("status") not in ("confirmed", "refuted"):
            continue
        obs = deciding.get(str(cand.get("id"))) or {}
        data = obs.get("data") or {}
        bbox = valid_bbox(cand.get("bbox"))
        if cand["status"] == "confirmed":
            bbox = bbox or valid_bbox(data.get("bbox"))
            if bbox is None:
                continue
            score = _number(data.get("evidence"))
            confirmed.append({"bbox": _box(bbox), "score": round(score if score is not None else item_score or 0.0, 4),
                              "candidate": cand.get("id"), "tool": obs.get("tool")})
        else:
            bbox = bbox or WHOLE_IMAGE
            refuted.append({"bbox": _box(bbox), "candidate": cand.get("id"), "tool": obs.get("tool")})
        regions.append(Region(bbox, cand["status"]))
    masks = []
    for obs in observations:
        if not isinstance(obs, dict) or not obs.get("ok") or not obs.get("mask"):
            continue
        # segment_anomaly on the expert's own map restates the rule's first term: not counted twice.
        if (obs.get("data") or {}).get("source") == "expert":
            continue
        try:
            masks.append(decode_mask(obs["mask"], shape))
        except ValueError:
            continue  # an unreadable mask is no evidence; the rest of the map stands
    direct = state.get("direct_reply") if isinstance(state.get("direct_reply"), dict) else {}
    direct_bbox = valid_bbox(direct.get("bbox")) if state.get("direct_label") == "anomalous" else None
    inputs = LocalizationInputs(excess, regions, masks, direct_bbox, item_score)
    confirmed.sort(key=lambda b: -b["score"])
    return inputs, {"boxes": confirmed, "refuted": refuted,
                    "direct_bbox": _box(direct_bbox) if direct_bbox else None, "map_shape": list(shape)}


def localize_state(state: dict[str, Any], ctx: ItemContext, rule: LocalizationRule = DEFAULT_RULE, *,
                   maps: bool = True) -> dict[str, Any]:
    """The ``localization`` value of a finished run: :func:`gather`'s boxes plus ``map_png`` (the
    agent's map) and ``expert_map_png`` (the expert's raw map alone, :func:`expert_map`) as
    16-bit PNG bytes (left out when ``maps`` is False), and ``elapsed_s``."""
    start = time.perf_counter()
    inputs, out = gather(state, ctx)
    if not maps:
        out["elapsed_s"] = round(time.perf_counter() - start, 4)
        return out
    out["map_png"] = encode_map(fuse_map(inputs, rule))
    out["expert_map_png"] = encode_map(expert_map(expert_map_at(ctx, DEFAULT_EXPERT, inputs.expert_excess.shape)))
    out["elapsed_s"] = round(time.perf_counter() - start, 4)
    return out


async def localize(state: PipelineState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Pipeline node: ``localization`` for the record (None, with a fallback saying why, when the
    expert's map cannot be computed: the scores stand without it)."""
    run = await arun_context(runtime.context, state)
    try:
        return {"localization": await to_compute_thread(localize_state, dict(state), run.item_context,
                                                         maps=run.config.anomaly_maps)}
    except Exception as exc:  # localization is an addition: its failure must not lose the item
        return {"localization": None, "fallbacks": [f"localization unavailable: {type(exc).__name__}: {exc}"]}
