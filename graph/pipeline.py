"""The pipeline: both branches of one item in the same step, concurrently, then ``fuse``.

::

    START ─┬─► direct ──────────────────────────────────────────┬─► fuse ─► END
           └─► propose ─► select_tool ⇄ observe ─► refute ... commit ┘
"""
from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from anomalyclaw.fusion import fuse as fuse_scores

from .context import RunContext
from .direct import direct
from .refutation import add_refutation_nodes
from .state import PipelineState

EXPERT = "anomaly_vfm"


def expert_unit_score(result: Any) -> float | None:
    """The expert's image score as a probability-like value in [0, 1]: a logistic of its
    z-score against the references' own leave-one-out scores (0.5 = a typical reference)."""
    refs = np.asarray(getattr(result, "reference_scores", []), dtype=float)
    score = float(getattr(result, "score", float("nan")))
    if not math.isfinite(score):
        return None
    if refs.size == 0:
        return float(getattr(result, "rank", 0.5))
    spread = float(refs.std()) if refs.size > 1 else 0.0
    spread = max(spread, 0.05 * abs(float(refs.mean())), 1e-6)
    z = (score - float(refs.mean())) / spread
    return float(1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z)))))


async def fuse(state: PipelineState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = runtime.context
    cfg = run.config
    expert = None
    fallbacks: list[str] = []
    if cfg.expert_score or cfg.expert_weight > 0:
        try:
            result = await asyncio.to_thread(run.item.expert_result, EXPERT)
            expert = expert_unit_score(result)
        except Exception as exc:  # the expert is optional: its failure must not lose the item
            fallbacks.append(f"expert score unavailable: {type(exc).__name__}: {exc}")
    score = fuse_scores(state.get("direct_score"), state.get("refute_score"), cfg.alpha, expert, cfg.expert_weight)
    return {"anomaly_score": score, "expert_score": expert, "fallbacks": fallbacks,
            "weights": {"direct": cfg.alpha, "refute": 1 - cfg.alpha, "expert": cfg.expert_weight}}


def build_pipeline(*, checkpointer: Any = None, name: str = "anomalyclaw"):
    """Both branches and the fusion as one compiled LangGraph.

    Run one item with ``await graph.ainvoke(new_state(item_id), context=make_context(item, vlm))``
    or watch it with ``graph.astream(..., stream_mode="updates")``.
    """
    graph = StateGraph(PipelineState, context_schema=RunContext)
    graph.add_node("direct", direct)
    add_refutation_nodes(graph)
    graph.add_node("fuse", fuse)
    graph.add_edge(START, "direct")
    graph.add_edge(START, "propose")
    graph.add_edge(["direct", "commit"], "fuse")
    graph.add_edge("fuse", END)
    return graph.compile(checkpointer=checkpointer, name=name)
