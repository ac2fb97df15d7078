"""The pipeline: both branches of one item in the same step, concurrently, then ``fuse``, then
``localize`` (the agent's boxes and anomaly map, :mod:`anomalyclaw.graph.localize`).

::

    START ─┬─► direct ──────────────────────────────────────────┬─► fuse ─► localize ─► END
           └─► propose ─► select_tool ⇄ observe ─► refute ... commit ┘

Two tasks share this shape: ``score`` (an anomaly score per image, the default) and ``mcqa``
(one multiple-choice question per run, ``graph.mcqa``: other prompts and reply models; it ends
at ``fuse``, with nothing to localize).
"""
from __future__ import annotations

import functools
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from anomalyclaw.experts.pool import FUSION_EXPERTS
from anomalyclaw.scores import fuse as fuse_scores
from anomalyclaw.scores import logistic
from anomalyclaw.threads import to_compute_thread

from .context import RunContext, arun_context
from .direct import direct
from .localize import localize
from .mcqa import add_mcqa_nodes
from .refutation import add_refutation_nodes
from .state import PipelineState


def _expert_results(ctx: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Each expert's result for the item in ``ctx``, or the exception it raised: all of them in
    one compute-thread hop (one per expert cost the event loop a wake-up each)."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = ctx.expert_result(name)
        except Exception as exc:
            out[name] = exc
    return out


async def fuse(state: PipelineState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """The fused score: the paper's blend plus the expert term (``anomalyclaw.scores.fuse``).

    The expert term is the mean of the per-item z-scores of :data:`FUSION_EXPERTS` (each
    against the item's references' leave-one-out scores), recorded as ``expert_score`` =
    ``logistic(mean z)`` with the z-scores themselves in ``expert_z``. An expert that fails is
    left out of the mean (the record's fallbacks say so); with none, the expert term counts as
    typical. ``AgentConfig.expert_score = False`` skips the experts (the fusion is the blend).
    """
    run = await arun_context(runtime.context, state)
    cfg = run.config
    fallbacks: list[str] = []
    zs: dict[str, float] = {}
    if cfg.expert_score:
        for name, result in (await to_compute_thread(_expert_results, run.item_context, FUSION_EXPERTS)).items():
            if isinstance(result, Exception):  # the expert is optional: its failure must not lose the item
                fallbacks.append(f"expert {name} unavailable: {type(result).__name__}: {result}")
                continue
            z = result.z_score()
            if z is None:
                fallbacks.append(f"expert {name} gave no finite z-score")
            else:
                zs[name] = round(z, 6)
    expert = logistic(sum(zs.values()) / len(zs)) if zs else None
    weight = cfg.expert_weight if cfg.expert_score else 0.0
    score = fuse_scores(state.get("direct_score"), state.get("refute_score"), cfg.alpha, expert, weight)
    return {"anomaly_score": score, "expert_score": expert, "expert_z": zs, "fallbacks": fallbacks,
            "weights": {"direct": cfg.alpha, "refute": 1 - cfg.alpha, "expert": weight}}


#: The tasks the pipeline runs.
TASKS = ("score", "mcqa")


def thread_config(item: Any) -> dict[str, Any]:
    """The run config that puts one item's run on its own checkpointed thread (``thread_id`` =
    the item id; ``item`` is an Item or an id), so that ``graph.get_state_history(config)``
    replays that item's turns."""
    item_id = getattr(item, "item_id", item)
    return {"configurable": {"thread_id": str(item_id)}}


def build_pipeline(*, task: str = "score", checkpointer: Any = None, name: str = "anomalyclaw",
                   context_schema: type = RunContext, input_schema: type | None = None):
    """Both branches and the fusion as one compiled LangGraph.

    Run one item with ``await graph.ainvoke(new_state(item_id), context=make_context(item, vlm))``
    or watch it with ``graph.astream(..., stream_mode="updates")``. ``task="mcqa"`` answers the
    multiple-choice question in the context (``make_context(..., question=...)``) instead.

    With a ``checkpointer`` (LangGraph's ``InMemorySaver``, or ``AsyncSqliteSaver`` from
    langgraph-checkpoint-sqlite for a file), pass ``thread_config(item)`` as the run config:
    every step of the item is kept, to inspect (``aget_state_history``), to stop and resume
    (``interrupt_before=[...]``, then ``ainvoke(None, config, context=...)`` with a fresh
    context), or to fork from an earlier step. The state holds plain data and LangChain
    messages only, so it checkpoints under ``LANGGRAPH_STRICT_MSGPACK=true`` too. A thread is one
    run of one item: invoking the same thread again continues it, so a second run wants a new
    saver (or thread). Resuming a batch run is the records file's job (``--resume``).

    ``context_schema`` / ``input_schema``: what LangGraph Studio builds (``anomalyclaw.studio``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    graph = StateGraph(PipelineState, context_schema=context_schema, input_schema=input_schema)
    if task == "mcqa":
        add_mcqa_nodes(graph)
    else:
        graph.add_node("direct", direct)
        add_refutation_nodes(graph)
        graph.add_node("fuse", fuse)
    graph.add_edge(START, "direct")
    graph.add_edge(START, "propose")
    graph.add_edge(["direct", "commit"], "fuse")
    if task == "mcqa":  # a letter per question: nothing to localize
        graph.add_edge("fuse", END)
    else:
        graph.add_node("localize", localize)
        graph.add_edge("fuse", "localize")
        graph.add_edge("localize", END)
    return graph.compile(checkpointer=checkpointer, name=name)


@functools.cache
def shared_pipeline(task: str = "score"):
    """:func:`build_pipeline` for ``task`` without a checkpointer, compiled once per process and
    shared by every runner: a compiled graph holds no per-item state (each ``ainvoke`` gets its
    own), and compiling costs ~26 ms of CPU (LangGraph reads each node function's bytecode),
    which each run, worker and Ray actor paid again. Build your own with :func:`build_pipeline`
    to change it (a checkpointer, other nodes)."""
    return build_pipeline(task=task)
