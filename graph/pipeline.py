"""The pipeline: both branches of one item in the same step, concurrently, then ``fuse``.

::

    START ─┬─► direct ──────────────────────────────────────────┬─► fuse ─► END
           └─► propose ─► select_tool ⇄ observe ─► refute ... commit ┘

Two tasks share this shape: ``score`` (an anomaly score per image, the default) and ``mcqa``
(one multiple-choice question per run, ``graph.mcqa``: other prompts and reply models).
"""
from __future__ import annotations

import asyncio
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from anomalyclaw.experts.pool import DEFAULT_EXPERT
from anomalyclaw.scores import fuse as fuse_scores

from .context import RunContext
from .direct import direct
from .mcqa import add_mcqa_nodes
from .refutation import add_refutation_nodes
from .state import PipelineState


async def fuse(state: PipelineState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = runtime.context
    cfg = run.config
    expert = None
    fallbacks: list[str] = []
    if cfg.expert_score or cfg.expert_weight > 0:
        try:
            result = await asyncio.to_thread(run.item_context.expert_result, DEFAULT_EXPERT)
            expert = result.unit_score()
        except Exception as exc:  # the expert is optional: its failure must not lose the item
            fallbacks.append(f"expert score unavailable: {type(exc).__name__}: {exc}")
    score = fuse_scores(state.get("direct_score"), state.get("refute_score"), cfg.alpha, expert, cfg.expert_weight)
    return {"anomaly_score": score, "expert_score": expert, "fallbacks": fallbacks,
            "weights": {"direct": cfg.alpha, "refute": 1 - cfg.alpha, "expert": cfg.expert_weight}}


#: The tasks the pipeline runs.
TASKS = ("score", "mcqa")


def build_pipeline(*, task: str = "score", checkpointer: Any = None, name: str = "anomalyclaw"):
    """Both branches and the fusion as one compiled LangGraph.

    Run one item with ``await graph.ainvoke(new_state(item_id), context=make_context(item, vlm))``
    or watch it with ``graph.astream(..., stream_mode="updates")``. ``task="mcqa"`` answers the
    multiple-choice question in the context (``make_context(..., question=...)``) instead.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    graph = StateGraph(PipelineState, context_schema=RunContext)
    if task == "mcqa":
        add_mcqa_nodes(graph)
    else:
        graph.add_node("direct", direct)
        add_refutation_nodes(graph)
        graph.add_node("fuse", fuse)
    graph.add_edge(START, "direct")
    graph.add_edge(START, "propose")
    graph.add_edge(["direct", "commit"], "fuse")
    graph.add_edge("fuse", END)
    return graph.compile(checkpointer=checkpointer, name=name)
