"""The offline backend: a deterministic rule-based policy that speaks the VLM reply format.

It is a stand-in for a real VLM, named as such in every record (``backend: offline``), so that
the graph, the demo, the notebook and the tests run with no network and no weights. It does
what the protocol asks a model to do, from numbers instead of pixels:

* direct: a global glance, the PCA-subspace expert's image score read against the references'
  own leave-one-out scores (a logistic of its z-score);
* propose: candidates from the patch-kNN expert's anomaly map (its hottest regions), an
  initial score from that expert, and a first tool chosen for the domain's traits;
* refute: a verdict on the tested candidate from the tool's calibrated ``evidence`` (high:
  confirmed, low: refuted, between: uncertain, which earns a second tool), a log-odds update
  of the score, then the next open candidate or a commit;
* commit (forced): the latest score.
"""
from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Sequence

from langchain_core.messages import BaseMessage

from .vlm import VLMReply, request_size

#: Evidence at or above this confirms a candidate; at or below REFUTE_AT refutes it.
CONFIRM_AT = 0.62
REFUTE_AT = 0.35
#: Log-odds moved per unit of (evidence - 0.5) by one observation.
EVIDENCE_GAIN = 3.0
#: Below this initial score the policy sees nothing worth testing and commits at once.
CLEARLY_NORMAL = 0.12
MAP_EXPERT = "anomaly_vfm"
GLANCE_EXPERT = "subspace_ad"


def _logit(p: float) -> float:
    p = min(1 - 1e-4, max(1e-4, p))
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def _zscore_probability(result: Any) -> float:
    from .pipeline import expert_unit_score  # noqa: PLC0415 (one definition of the reading)

    p = expert_unit_score(result)
    return 0.5 if p is None else p


def tool_plan(traits: frozenset[str], available: Sequence[str]) -> list[str]:
    """Tools to test a candidate with, best first, for a domain's traits."""
    plan: list[str] = []
    if "bi_temporal" in traits:
        plan += ["change_heatmap_viz", "image_diff"]
    if "counting" in traits:
        plan += ["blob_layout_viz"]
    if "rotating" in traits:
        plan += ["rotate_align"]
    if "aligned" in traits and "rotating" not in traits:
        plan += ["image_diff"]
    if "texture" in traits:
        plan += ["fft_spectrum_viz"]
    plan += ["side_by_side_compare", "reference_profile", "region_zoom"]
    seen: list[str] = []
    for name in plan:
        if name in available and name not in seen:
            seen.append(name)
    return seen


class OfflineVLM:
    """Deterministic rule-based stand-in for a VLM (see the module docstring)."""

    backend = "offline"
    model = "offline-rule-policy-v1"

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, context: Any = None,
                    logprobs: bool = False) -> VLMReply:
        if context is None:
            raise ValueError("the offline backend needs the run context (it reads tool and expert numbers)")
        nbytes, nimages = request_size(messages)
        memory = context.extras.setdefault("offline", {})
        if stage == "direct":
            text = await self._direct(context)
        elif stage == "direct_logprob":
            p = await self._glance(context)
            return VLMReply(text="anomalous" if p >= 0.5 else "normal", stage=stage, request_bytes=nbytes,
                            images_sent=nimages, top_logprobs=[
                                {"token": "anomalous", "logprob": math.log(max(p, 1e-6))},
                                {"token": "normal", "logprob": math.log(max(1 - p, 1e-6))}])
        elif stage == "propose":
            text = await self._propose(context, memory)
        elif stage == "refute":
            text = self._refute(context, memory)
        elif stage == "commit":
            text = json.dumps({"anomaly_score": round(memory.get("score", 0.5), 4), "confidence": 60,
                               "rationale": "turn limit reached; latest score kept"})
        else:
            raise ValueError(f"the offline backend has no policy for stage {stage!r}")
        return VLMReply(text=text, stage=stage, request_bytes=nbytes, images_sent=nimages)

    # ------------------------------------------------------------------------------ stages
    async def _glance(self, run: Any) -> float:
        result = await asyncio.to_thread(run.item.expert_result, GLANCE_EXPERT)
        return _zscore_probability(result)

    async def _direct(self, run: Any) -> str:
        p = await self._glance(run)
        label = "anomalous" if p >= 0.5 else "normal"
        return json.dumps({"image_label": label, "confidence": round(max(p, 1 - p), 4),
                           "anomaly_type": "deviation from references" if label == "anomalous" else None,
                           "evidence": f"global subspace residual reads as P(anomalous)={p:.2f} against the references",
                           "bbox": None})

    async def _propose(self, run: Any, memory: dict[str, Any]) -> str:
        from anomalyclaw.experts.maps import normalize_map, top_regions  # noqa: PLC0415

        result = await asyncio.to_thread(run.item.expert_result, MAP_EXPERT)
        score = _zscore_probability(result)
        low, high = result.normal_range
        heat = normalize_map(result.anomaly_map, low, high)
        regions = top_regions(heat, k=run.config.max_candidates, level=0.6)
        if not regions and score >= CLEARLY_NORMAL:
            regions = top_regions(normalize_map(result.anomaly_map), k=1, level=0.6)
        available = [t.name for t, ok, _ in run.registry.applicable(run.item.item) if ok]
        plan = tool_plan(run.item.traits, available)
        candidates = [{"id": f"c{i + 1}", "description": f"expert hotspot (peak {r['peak']:.2f} of the normal "
                       f"range, {100 * r['area_frac']:.1f}% of the image)", "bbox": r["bbox"]}
                      for i, r in enumerate(regions)]
        memory.update(score=score, plan=plan, tried={}, candidates={c["id"]: c for c in candidates})
        if score < CLEARLY_NORMAL or not candidates or not plan:
            candidates = [] if score < CLEARLY_NORMAL else candidates
            return json.dumps({"initial_score": round(score, 4), "candidates": candidates,
                               "action": {"commit": True},
                               "rationale": f"expert reads the query as typical of the references (P={score:.2f})"})
        action = self._next_action(memory, candidates[0]["id"])
        return json.dumps({"initial_score": round(score, 4), "candidates": candidates, "action": action,
                           "rationale": f"{len(candidates)} expert hotspot(s) to test against the references"})

    def _next_action(self, memory: dict[str, Any], cid: str) -> dict[str, Any]:
        tried = memory["tried"].setdefault(cid, [])
        for name in memory["plan"]:
            if name not in tried:
                tried.append(name)
                cand = memory["candidates"][cid]
                args = {"bbox": cand["bbox"]} if cand.get("bbox") else {}
                return {"tool": name, "args": args, "candidate": cid}
        return {"commit": True}

    def _refute(self, run: Any, memory: dict[str, Any]) -> str:
        obs = run.item.observations[-1] if run.item.observations else None
        data = getattr(obs, "data", {}) or {}
        evidence = data.get("evidence")
        tested = getattr(obs, "args", {}) or {}
        cid = self._candidate_for(memory, tested)
        verdicts = []
        score = memory.get("score", 0.5)
        if isinstance(evidence, (int, float)) and math.isfinite(evidence) and getattr(obs, "ok", False):
            status = "confirmed" if evidence >= CONFIRM_AT else "refuted" if evidence <= REFUTE_AT else "uncertain"
            score = _sigmoid(_logit(score) + EVIDENCE_GAIN * 2.0 * (float(evidence) - 0.5))
            verdicts.append({"id": cid, "status": status,
                             "evidence": f"{obs.tool} evidence {evidence:.2f} ({'found' if data.get('found') else 'not found'})"})
            memory["candidates"][cid]["status"] = status
        else:
            why = getattr(obs, "error", None) or "no measurement"
            verdicts.append({"id": cid, "status": "uncertain", "evidence": f"{getattr(obs, 'tool', '?')}: {why}"})
            memory["candidates"][cid]["status"] = "uncertain"
        memory["score"] = score
        action: dict[str, Any] = {"commit": True}
        status = memory["candidates"][cid]["status"]
        if status == "uncertain":
            action = self._next_action(memory, cid)
        if action.get("commit") and status != "confirmed":
            for other, cand in memory["candidates"].items():
                if cand.get("status") in (None, "open"):
                    action = self._next_action(memory, other)
                    if not action.get("commit"):
                        break
        return json.dumps({"verdicts": verdicts, "updated_score": round(score, 4), "action": action,
                           "rationale": "confirmed a candidate" if status == "confirmed" else
                           "testing the remaining candidates" if not action.get("commit") else
                           "every candidate tested"})

    @staticmethod
    def _candidate_for(memory: dict[str, Any], args: dict[str, Any]) -> str:
        bbox = args.get("bbox")
        for cid, cand in memory["candidates"].items():
            if bbox is not None and cand.get("bbox") == list(bbox):
                return cid
        last = [cid for cid, tried in memory["tried"].items() if tried]
        return last[-1] if last else next(iter(memory["candidates"]), "c1")
