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

The multiple-choice task (``mcq_*`` stages) is played from the question's words, as a model
sees them (never from its MMAD type, which no prompt shows): yes/no options are read as "is
there a defect?", options that name image regions as "where?", numbers as "how many?", and
anything else as "which kind?". The direct answer is the glance (the expert's score; the
expert map's peak for "where?"; no evidence, hence the first option, for "how many?" and
"which kind?"); the refutation tests the options with one tool at a time (the domain's
whole-image comparisons for a defect, then ``segment_anomaly``; ``blob_layout_viz`` for counts
and for missing, extra, moved or resized parts) and answers from the tool's numbers.

Offered ``tools`` (native tool calling), it answers as a model with a tool parser does: the
action becomes a tool call beside the JSON text.

Its thresholds live in :class:`OfflinePolicy`; the defaults were chosen on a synthetic benchmark
generated with seed 1, never on the seed-0 benchmark the demo reports.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from langchain_core.messages import BaseMessage

import re

import numpy as np

from anomalyclaw.experts.maps import normalize_map, top_regions
from anomalyclaw.items import Question
from anomalyclaw.scores import logistic, logit

from ..replies import (COMMIT, commit_reply, direct_reply, mcq_commit_reply, mcq_propose_reply, mcq_refute_reply,
                       native_reply, propose_reply, refute_reply, tool_action)
from .seam import RunView, VLMReply, read_tool_call, request_size, tools_size


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


def glance(view: RunView) -> float:
    """P(anomalous) at a glance: the default expert's unit score (0.5 when it has none)."""
    p = view.expert().unit_score()
    return 0.5 if p is None else p


class _Episode:
    """One item's refutation as the policy plays it. The policy keeps no memory between calls:
    every call replays the episode from the view (the expert's reading and the observations so
    far), which is deterministic, so a resumed or re-run conversation gets the same replies."""

    def __init__(self, policy: OfflinePolicy, view: RunView, score: float):
        self.policy = policy
        self.score = score
        result = view.expert()
        heat = normalize_map(result.anomaly_map, *result.normal_range)
        self.whole = _unique_available(whole_image_tools(view.traits), view.tools)
        regional = _unique_available(region_tools(view.traits), view.tools)
        candidates: list[dict[str, Any]] = []
        if self.whole:
            candidates.append({"id": "c1", "description": "a difference from the references anywhere in the image",
                               "bbox": None})
        n_hot = max(0, view.max_candidates - len(candidates))
        for r in top_regions(heat, k=n_hot, level=policy.hotspot_level) if n_hot else []:
            candidates.append({"id": f"c{len(candidates) + 1}",
                               "description": f"expert hotspot ({100 * r['area_frac']:.1f}% of the image, peak "
                                              f"{r['peak']:.2f} of the worst reference)", "bbox": r["bbox"]})
        self.listed = candidates
        self.candidates = {c["id"]: dict(c) for c in candidates}
        self.plans = {c["id"]: (self.whole if c["bbox"] is None else regional) for c in candidates}
        self.tried: dict[str, list[str]] = {}
        self.testing: str | None = None

    def opening(self) -> str:
        """The propose reply."""
        if not self.listed or (not self.whole and self.score < self.policy.clearly_normal):
            return propose_reply(round(self.score, 4), [], COMMIT,
                                 f"nothing stands out against the references (P={self.score:.2f})")
        action = self._next_action(self.listed[0]["id"])
        return propose_reply(round(self.score, 4), self.listed, action,
                             f"{len(self.listed)} candidate(s) to test against the references")

    def _next_action(self, cid: str) -> dict[str, Any]:
        tried = self.tried.setdefault(cid, [])
        for name in self.plans[cid]:
            if name not in tried:
                tried.append(name)
                cand = self.candidates[cid]
                self.testing = cid
                return tool_action(name, {"bbox": cand["bbox"]} if cand.get("bbox") else {}, cid)
        return dict(COMMIT)

    def step(self, obs: Mapping[str, Any]) -> str:
        """The refute reply to one observation (which tested the candidate last acted on)."""
        pol = self.policy
        data = obs.get("data") or {}
        evidence = data.get("evidence")
        cid = self.testing or next(iter(self.candidates), "c1")
        cand = self.candidates[cid]
        if isinstance(evidence, (int, float)) and math.isfinite(evidence) and obs.get("ok"):
            status = ("confirmed" if evidence >= pol.confirm_at else
                      "refuted" if evidence <= pol.refute_at else "uncertain")
            gain = pol.whole_image_gain if cand.get("bbox") is None else pol.region_gain
            self.score = logistic(logit(self.score) + gain * 2.0 * (float(evidence) - 0.5))
            found = "found" if data.get("found") else "nothing found"
            note = f"{obs.get('tool')}: evidence {evidence:.2f} ({found})"
        else:
            status, note = "uncertain", f"{obs.get('tool', '?')}: {obs.get('error') or 'no measurement'}"
        cand["status"] = status
        action: dict[str, Any] = dict(COMMIT)
        if status == "uncertain":
            action = self._next_action(cid)
        if action.get("commit") and status != "confirmed":
            for other, c in self.candidates.items():
                if "status" not in c:
                    action = self._next_action(other)
                    if not action.get("commit"):
                        break
        rationale = ("a candidate survived its test" if status == "confirmed" else
                     "testing the next candidate" if not action.get("commit") else "every candidate tested")
        return refute_reply([{"id": cid, "status": status, "evidence": note}], round(self.score, 4), action,
                            rationale)


# ------------------------------------------------------------------------- multiple choice
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
#: Words of a defect kind that each reading of ``blob_layout_viz`` supports.
_PART_WORDS = {"extra": ("extra", "additional", "too many", "surplus"),
               "missing": ("missing", "absent", "lack", "removed"),
               "shift": ("misplaced", "moved", "shifted", "displaced", "position", "out of"),
               "resize": ("size", "larger", "smaller", "bigger", "sized")}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def option_number(text: str) -> int | None:
    """The count an option names ("12", "Twelve coins."), or None."""
    words = _words(text).split()
    for w in words:
        if w.isdigit():
            return int(w)
        if w in _NUMBER_WORDS:
            return _NUMBER_WORDS[w]
    return None


def option_point(text: str) -> tuple[float, float] | None:
    """The (x, y) in [0, 1] of the image region an option names ("Top left.", "Center."), or None."""
    words = set(_words(text).split())
    x = 0.25 if "left" in words else 0.75 if "right" in words else 0.5
    y = 0.25 if words & {"top", "upper"} else 0.75 if words & {"bottom", "lower"} else 0.5
    named = words & {"left", "right", "top", "upper", "bottom", "lower", "center", "centre", "middle"}
    return (x, y) if named else None


def question_kind(question: Question) -> str:
    """"yes_no", "count", "where" or "which", from the question's and options' words."""
    texts = [t for _, t in question.options]
    if sorted(_words(t) for t in texts) == ["no", "yes"]:
        return "yes_no"
    if "how many" in _words(question.text) or all(option_number(t) is not None for t in texts):
        return "count"
    if all(option_point(t) is not None for t in texts):
        return "where"
    return "which"


def _nearest_point(question: Question, x: float, y: float) -> str:
    points = [(letter, option_point(text)) for letter, text in question.options]
    return min((p for p in points if p[1] is not None), key=lambda p: (p[1][0] - x) ** 2 + (p[1][1] - y) ** 2)[0]


def _yes_no(question: Question, yes: bool) -> str:
    want = "yes" if yes else "no"
    return next(letter for letter, text in question.options if _words(text) == want)


class _McqEpisode:
    """One question's refutation as the policy plays it; like :class:`_Episode`, replayed from
    the view on every call."""

    def __init__(self, policy: OfflinePolicy, view: RunView, p: float):
        self.policy, self.view, self.question = policy, view, view.question
        self.kind = question_kind(self.question)
        self.score = p
        self.answer = self.glance_answer(view, p)
        traits, tools = view.traits, view.tools
        whole = _unique_available(whole_image_tools(traits), tools)
        if self.kind == "yes_no":
            plan = whole or _unique_available(["segment_anomaly"], tools)
        elif self.kind == "where":
            plan = _unique_available(whole + ["segment_anomaly"], tools)
        else:  # counts, and kinds of part defects, need a blob census
            plan = _unique_available(["blob_layout_viz"], tools)
        self.plan = plan
        self.tested = (_yes_no(self.question, True) if self.kind == "yes_no" else self.answer)
        self.done = False
        self.note = "no tool answers this kind of question here; the first look stands"

    def glance_answer(self, view: RunView, p: float) -> str:
        q = self.question
        if self.kind == "yes_no":
            return _yes_no(q, p >= 0.5)
        if self.kind == "where":
            result = view.expert()
            row, col = np.unravel_index(int(np.argmax(result.anomaly_map)), result.anomaly_map.shape)
            h, w = result.anomaly_map.shape
            return _nearest_point(q, (col + 0.5) / w, (row + 0.5) / h)
        return q.options[0][0]  # no evidence: the first option

    def _action(self, n_done: int) -> dict[str, Any]:
        if self.done or n_done >= len(self.plan):
            return dict(COMMIT)
        return tool_action(self.plan[n_done], {}, self.tested)

    def opening(self) -> str:
        if not self.plan:
            self.done = True
            return mcq_propose_reply(self.answer, COMMIT, self.note)
        return mcq_propose_reply(self.answer, self._action(0), f"test the options with {self.plan[0]}")

    def step(self, obs: Mapping[str, Any], n_done: int) -> str:
        """The refute reply to the ``n_done``-th observation (1-based)."""
        data = obs.get("data") or {}
        decided = False
        if obs.get("ok"):
            decided = self._read(obs.get("tool"), data)
        if decided:
            self.done = True
            verdicts = [{"id": letter, "status": "confirmed" if letter == self.answer else "refuted",
                         "evidence": self.note} for letter, _ in self.question.options]
        else:
            verdicts = [{"id": self.tested, "status": "uncertain",
                         "evidence": f"{obs.get('tool', '?')}: {obs.get('error') or 'no usable reading'}"}]
        action = self._action(n_done)
        rationale = self.note if decided else ("trying the next tool" if not action.get("commit") else
                                               "no tool settled it; the first look stands")
        return mcq_refute_reply(verdicts, self.answer, action, rationale)

    def _read(self, tool: str | None, data: Mapping[str, Any]) -> bool:
        """Update the answer from one observation's numbers; True when they settle it."""
        pol, q = self.policy, self.question
        if self.kind == "yes_no":
            evidence = data.get("evidence")
            if not isinstance(evidence, (int, float)) or not math.isfinite(evidence):
                return False
            self.score = logistic(logit(self.score) + pol.whole_image_gain * 2.0 * (float(evidence) - 0.5))
            self.answer = _yes_no(q, self.score >= 0.5)
            self.note = f"{tool}: evidence {evidence:.2f}, P(defect) now {self.score:.2f}"
            return not pol.refute_at < evidence < pol.confirm_at
        if self.kind == "where":
            box = data.get("bbox")
            if not box or not data.get("found", True):
                return False
            x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            self.answer = _nearest_point(q, x, y)
            self.note = f"{tool}: the main finding is centred at ({x:.2f}, {y:.2f})"
            return True
        if self.kind == "count":
            count = data.get("count")
            numbers = [(letter, option_number(text)) for letter, text in q.options]
            numbers = [(letter, n) for letter, n in numbers if n is not None]
            if not isinstance(count, (int, float)) or not numbers:
                return False
            self.answer = min(numbers, key=lambda t: abs(t[1] - count))[0]
            self.note = f"{tool}: {count:g} blobs in the query"
            return True
        # "which": a part defect named by the census's strongest reading
        reading = None
        if data.get("evidence", 0) and data.get("evidence") >= pol.refute_at:
            strongest = data.get("strongest")
            if strongest in ("count", "layout"):
                reading = "extra" if data.get("extra", 0) >= max(1, data.get("missing", 0)) else \
                    "missing" if data.get("missing") else None
            elif strongest in ("shift", "resize"):
                reading = strongest
        if reading is None:
            return False
        matches = [letter for letter, text in q.options if any(w in text.lower() for w in _PART_WORDS[reading])]
        if len(matches) != 1:
            return False
        self.answer = matches[0]
        self.note = f"{tool}: the census reads a {reading} part"
        return True


def _mcq_reply(policy: OfflinePolicy, stage: str, view: RunView, p: float) -> str:
    if view.question is None:
        raise ValueError(f"stage {stage!r} needs the question in the run's view")
    episode = _McqEpisode(policy, view, p)
    if stage == "mcq_direct":
        return episode.answer
    text = episode.opening()
    for k, obs in enumerate(view.observations, 1):
        text = episode.step(obs, k)
    if stage == "mcq_commit":
        text = mcq_commit_reply(episode.answer, "turn limit reached; latest answer kept")
    return text


class OfflineVLM:
    """Deterministic rule-based stand-in for a VLM (see the module docstring)."""

    backend = "offline"
    model = "offline-rule-policy-v2"

    def __init__(self, policy: OfflinePolicy | None = None, *, max_concurrency: int = 2):
        self.policy = policy or OfflinePolicy()
        self.max_concurrency = max(1, int(max_concurrency))
        """The run's ``--concurrency``: there are no requests to bound here, but the runner sizes
        its items in flight from it, as for an endpoint (and ``--workers`` shares it out)."""

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, view: RunView | None = None,
                    logprobs: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> VLMReply:
        if view is None:
            raise ValueError("the offline backend needs the run's view (it reads tool and expert numbers)")
        nbytes, nimages = request_size(messages)
        nbytes += tools_size(tools)
        # The expert's first reading fits it on the references: CPU work, off the event loop.
        p = await asyncio.to_thread(glance, view)
        if stage == "direct_logprob":
            return VLMReply(text="anomalous" if p >= 0.5 else "normal", stage=stage, request_bytes=nbytes,
                            images_sent=nimages, top_logprobs=[
                                {"token": "anomalous", "logprob": math.log(max(p, 1e-6))},
                                {"token": "normal", "logprob": math.log(max(1 - p, 1e-6))}])
        if stage == "direct":
            text = self._direct(p)
        elif stage in ("propose", "refute", "commit"):
            episode = _Episode(self.policy, view, p)
            text = episode.opening()
            for obs in view.observations:
                text = episode.step(obs)
            if stage == "commit":
                text = commit_reply(round(episode.score, 4), 60, "turn limit reached; latest score kept")
        elif stage.startswith("mcq_"):
            text = _mcq_reply(self.policy, stage, view, p)
        else:
            raise ValueError(f"the offline backend has no policy for stage {stage!r}")
        calls = None
        if tools:
            text, wire = native_reply(text)
            calls = [read_tool_call(f"call_{stage}_{len(view.observations)}_{k}", c["name"], c["arguments"])
                     for k, c in enumerate(wire)]
        return VLMReply(text=text, stage=stage, request_bytes=nbytes, images_sent=nimages, tool_calls=calls)

    @staticmethod
    def _direct(p: float) -> str:
        label = "anomalous" if p >= 0.5 else "normal"
        return direct_reply(label, round(max(p, 1 - p), 4), "deviation from references" if label == "anomalous" else None,
                            f"patch features read as P(anomalous)={p:.2f} against the references", None)
