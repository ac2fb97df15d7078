"""Typed state of the graphs: what a notebook streams turn by turn, and what a record is made of."""
from __future__ import annotations

import operator
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.messages import BaseMessage

CandidateStatus = Literal["open", "refuted", "confirmed", "uncertain"]


class CandidateState(TypedDict, total=False):
    id: str
    description: str
    bbox: list[float] | None
    status: CandidateStatus
    evidence: str


class RefuteState(TypedDict, total=False):
    """The refutation branch. List fields marked ``operator.add`` accumulate across nodes."""

    item_id: str
    messages: Annotated[list[BaseMessage], operator.add]
    """The conversation as sent with ``image_history="all"`` (images are data URLs)."""
    turn: int
    """VLM calls made by propose and refute so far."""
    initial_score: float | None
    score: float | None
    """The latest score the model gave (initial, then each update)."""
    candidates: list[CandidateState]
    verdicts: Annotated[list[dict[str, Any]], operator.add]
    pending: dict[str, Any] | None
    """The model's next action: {"tool", "args", "candidate"} or {"commit": True}."""
    route: str
    """select_tool's decision: "observe" or "commit"."""
    call: dict[str, Any] | None
    """The checked tool call observe will run (``CheckedCall.to_state()`` plus ``candidate``), or
    ``{"tool", "candidate", "rejected": observation}`` when it cannot run."""
    forced: bool
    tool_calling: str
    """How this item's conversation calls tools: "json" (actions in the reply) or "native"
    (tool calls); fixed by propose."""
    tools_used: Annotated[list[str], operator.add]
    observations: Annotated[list[dict[str, Any]], operator.add]
    """Tool observations as plain data (``Observation.to_state()``: tool, text, images with
    their bytes, numbers); the registry produces them, this list is where they are kept."""
    history: Annotated[list[dict[str, Any]], operator.add]
    """One row per turn: stage, reply, action, tool, observation text (for records and traces)."""
    calls: Annotated[list[dict[str, Any]], operator.add]
    """Usage of each VLM call of this branch."""
    fallbacks: Annotated[list[str], operator.add]
    refute_score: float | None
    refute_confidence: float | None
    refute_rationale: str
    refute_error: str | None
    # The multiple-choice task (--task mcqa): the options are the candidates.
    answer: str | None
    """The latest option letter the model gave (propose, then each refute)."""
    option_scores: dict[str, float] | None
    refute_answer: str | None
    refute_option_scores: dict[str, float] | None


class DirectState(TypedDict, total=False):
    """The direct branch: one VLM call."""

    item_id: str
    direct_score: float | None
    direct_label: str | None
    direct_confidence: float | None
    direct_reply: dict[str, Any] | None
    direct_error: str | None
    direct_calls: Annotated[list[dict[str, Any]], operator.add]
    direct_fallbacks: Annotated[list[str], operator.add]
    direct_answer: str | None
    """The multiple-choice task: the direct branch's option letter (None when unparseable)."""


class PipelineState(RefuteState, DirectState, total=False):
    """Both branches of one item and their fusion."""

    expert_score: float | None
    expert_z: dict[str, float]
    anomaly_score: float | None
    weights: dict[str, float]
    mcq_answer: dict[str, str | None]
    """The multiple-choice task: each branch's letter, ``{"direct": ..., "refute": ...}``."""
    localization: dict[str, Any] | None
    """Where the anomaly is (``graph.localize``): confirmed and refuted boxes, and the agent's
    and the expert's maps as 16-bit PNG bytes (``map_png``, ``expert_map_png``)."""


def new_state(item_id: str) -> PipelineState:
    """The input of any of the three graphs for one item."""
    return {"item_id": item_id}
