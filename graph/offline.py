"""The offline backend: a deterministic rule-based policy that speaks the VLM reply format.

It is a stand-in for a real VLM, named as such in every record (``backend: offline``), so that
the graph, the demo, the notebook and the tests run with no network and no weights. It does
what the protocol asks a model to do, from numbers instead of pixels:

* direct: a global glance, the patch-kNN expert's image score read against the references'
  own leave-one-out scores (a logistic of its z-score);
* propose: the same reading as the initial score; candidates are "a difference anywhere in the
  image" (when the domain has a tool that compares whole images: a change map for bi-temporal
  pairs, rotation-tolerant registration for rigid objects, a registered difference for aligned
  scenes, a blob census for counting) and the expert map's hottest regions; the first tool is
  the one the domain's traits make most telling;
* refute: a verdict on the tested candidate from the tool's calibrated ``evidence`` (high:
  confirmed, low: refuted, between: uncertain, which earns the next tool), a log-odds update
  of the score, then the next open candidate or a commit;
* commit (forced): the latest score.

Its thresholds live in :class:`OfflinePolicy`; the defaults were chosen on a synthetic benchmark
generated with seed 1, never on the seed-0 benchmark the demo reports.
"""
from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from langchain_core.messages import BaseMessage

from .vlm import VLMReply, request_size

MAP_EXPERT = "anomaly_vfm"


@dataclass(frozen=True)
class OfflinePolicy:
    """The rule set's numbers."""

    confirm_at: float = 0.6
    """Evidence at or above this confirms a candidate."""
    refute_at: float = 0.3
    """Evidence at or below this refutes it; between the two it is uncertain."""
    whole_image_gain: float = 6.0
    """Log-odds moved per unit of (evidence - 0.5) by a whole-image comparison."""
    region_gain: float = 0.5
    """... and by a test of one region."""
    clearly_normal: float = 0.1
    """Below this initial score, with no whole-image tool to consult, commit at once."""
    hotspot_level: float = 0.6
    """Expert-map level (0 = a normal patch, 1 = the worst reference) that makes a hotspot."""


def _logit(p: float) -> float:
    p = min(1 - 1e-4, max(1e-4, p))
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def whole_image_tools(traits: frozenset[str]) -> list[str]:
    """Tools that compare the whole query with the references, most telling first."""
    plan = []
    if "bi_temporal" in traits:
        plan.append("change_heatmap_viz")
    if "rotating" in traits or "object" in traits:
        plan.append("rotate_align")
    if "aligned" in traits:
        plan.append("image_diff")
    if "counting" in traits:
        plan.append("blob_layout_viz")
    return plan


def region_tools(traits: frozenset[str]) -> list[str]:
    """Tools that test one region against the references, most telling first."""
    plan = whole_image_tools(traits) + ["anomaly_vfm_score", "segment_anomaly"]
    if "texture" in traits:
        plan.append("fft_spectrum_viz")
    return plan + ["side_by_side_compare"]


def _unique_available(names: Sequence[str], available: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n in available and n not in out:
            out.append(n)
    return out


class OfflineVLM:
    """Deterministic rule-based stand-in for a VLM (see the module docstring)."""

    backend = "offline"
    model = "offline-rule-policy-v2"

    def __init__(self, policy: OfflinePolicy | None = None):
        self.policy = policy or OfflinePolicy()

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
        from .pipeline import expert_unit_score  # noqa: PLC0415 (one definition of the reading)

        result = await asyncio.to_thread(run.item.expert_result, MAP_EXPERT)
        p = expert_unit_score(result)
        return 0.5 if p is None else p

    async def _direct(self, run: Any) -> str:
        p = await self._glance(run)
        label = "anomalous" if p >= 0.5 else "normal"
        return json.dumps({"image_label": label, "confidence": round(max(p, 1 - p), 4),
                           "anomaly_type": "deviation from references" if label == "anomalous" else None,
                           "evidence": f"patch features read as P(anomalous)={p:.2f} against the references",
                           "bbox": None})

    async def _propose(self, run: Any, memory: dict[str, Any]) -> str:
        from anomalyclaw.experts.maps import normalize_map, top_regions  # noqa: PLC0415

        pol = self.policy
        score = await self._glance(run)
        result = run.item.expert_result(MAP_EXPERT)  # cached by the glance
        heat = normalize_map(result.anomaly_map, *result.normal_range)
        available = [t.name for t, ok, _ in run.registry.applicable(run.item.item) if ok]
        traits = run.item.traits
        whole = _unique_available(whole_image_tools(traits), available)
        regional = _unique_available(region_tools(traits), available)
        candidates: list[dict[str, Any]] = []
        if whole:
            candidates.append({"id": "c1", "description": "a difference from the references anywhere in the image",
                               "bbox": None})
        n_hot = max(0, run.config.max_candidates - len(candidates))
        for r in top_regions(heat, k=n_hot, level=pol.hotspot_level) if n_hot else []:
            candidates.append({"id": f"c{len(candidates) + 1}",
                               "description": f"expert hotspot ({100 * r['area_frac']:.1f}% of the image, peak "
                                              f"{r['peak']:.2f} of the worst reference)", "bbox": r["bbox"]})
        memory.update(score=score, tried={}, candidates={c["id"]: dict(c) for c in candidates},
                      plans={c["id"]: (whole if c["bbox"] is None else regional) for c in candidates})
        if not candidates or (not whole and score < pol.clearly_normal):
            return json.dumps({"initial_score": round(score, 4), "candidates": [], "action": {"commit": True},
                               "rationale": f"nothing stands out against the references (P={score:.2f})"})
        action = self._next_action(memory, candidates[0]["id"])
        return json.dumps({"initial_score": round(score, 4), "candidates": candidates, "action": action,
                           "rationale": f"{len(candidates)} candidate(s) to test against the references"})

    def _next_action(self, memory: dict[str, Any], cid: str) -> dict[str, Any]:
        tried = memory["tried"].setdefault(cid, [])
        for name in memory["plans"][cid]:
            if name not in tried:
                tried.append(name)
                cand = memory["candidates"][cid]
                memory["testing"] = cid
                return {"tool": name, "args": {"bbox": cand["bbox"]} if cand.get("bbox") else {},
                        "candidate": cid}
        return {"commit": True}

    def _refute(self, run: Any, memory: dict[str, Any]) -> str:
        pol = self.policy
        obs = run.item.observations[-1] if run.item.observations else None
        data = getattr(obs, "data", {}) or {}
        evidence = data.get("evidence")
        cid = memory.get("testing") or next(iter(memory["candidates"]), "c1")
        cand = memory["candidates"][cid]
        score = memory.get("score", 0.5)
        if isinstance(evidence, (int, float)) and math.isfinite(evidence) and getattr(obs, "ok", False):
            status = ("confirmed" if evidence >= pol.confirm_at else
                      "refuted" if evidence <= pol.refute_at else "uncertain")
            gain = pol.whole_image_gain if cand.get("bbox") is None else pol.region_gain
            score = _sigmoid(_logit(score) + gain * 2.0 * (float(evidence) - 0.5))
            found = "found" if data.get("found") else "nothing found"
            note = f"{obs.tool}: evidence {evidence:.2f} ({found})"
        else:
            status, note = "uncertain", f"{getattr(obs, 'tool', '?')}: {getattr(obs, 'error', None) or 'no measurement'}"
        cand["status"] = status
        memory["score"] = score
        action: dict[str, Any] = {"commit": True}
        if status == "uncertain":
            action = self._next_action(memory, cid)
        if action.get("commit") and status != "confirmed":
            for other, c in memory["candidates"].items():
                if "status" not in c:
                    action = self._next_action(memory, other)
                    if not action.get("commit"):
                        break
        rationale = ("a candidate survived its test" if status == "confirmed" else
                     "testing the next candidate" if not action.get("commit") else "every candidate tested")
        return json.dumps({"verdicts": [{"id": cid, "status": status, "evidence": note}],
                           "updated_score": round(score, 4), "action": action, "rationale": rationale})
