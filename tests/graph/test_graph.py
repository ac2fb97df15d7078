"""The graphs on the offline backend: node order, state, streaming, records."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools

import pytest

from anomalyclaw.config import AgentConfig
from anomalyclaw.experts.pool import FUSION_EXPERTS
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.direct import build_direct_graph
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.refutation import build_refutation_graph
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.prompts import PromptSet
from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT, fuse, logistic
from anomalyclaw.tools.registry import ToolRegistry


def _anomalous(items, traits=None):
    for it in items:
        if it.label == 1 and (traits is None or traits <= it.traits):
            return it
    raise AssertionError("no such item")


async def test_refutation_graph_streams_turns(small_items):
    item = _anomalous(small_items, {"aligned"})
    graph = build_refutation_graph()
    ctx = make_context(item, make_vlm("offline"))
    nodes = []
    async for update in graph.astream(new_state(item.item_id), context=ctx, stream_mode="updates"):
        nodes.extend(update)
    assert nodes[0] == "propose" and nodes[-1] == "commit"
    assert set(nodes) <= {"propose", "select_tool", "observe", "refute", "commit"}
    if "observe" in nodes:  # every observation is followed by a refute turn
        assert nodes.index("refute") == nodes.index("observe") + 1
    state = await graph.ainvoke(new_state(item.item_id), context=make_context(item, make_vlm("offline")))
    assert 0.0 <= state["refute_score"] <= 1.0
    assert state["turn"] <= AgentConfig().max_turns
    assert len(state["calls"]) == state["turn"]  # one VLM call per turn, no forced final here


async def test_direct_graph_one_call(small_items):
    item = small_items[0]
    state = await build_direct_graph().ainvoke(new_state(item.item_id),
                                               context=make_context(item, make_vlm("offline")))
    assert len(state["direct_calls"]) == 1
    assert state["direct_label"] in ("normal", "anomalous") and 0 <= state["direct_score"] <= 1


async def test_pipeline_fuses_the_expert_term_by_default_and_weight_zero_is_the_blend(small_items):
    item = _anomalous(small_items)
    state = await build_pipeline().ainvoke(new_state(item.item_id),
                                           context=make_context(item, make_vlm("offline"), config=AgentConfig(alpha=0.3)))
    zs = state["expert_z"]
    assert set(zs) == set(FUSION_EXPERTS) == {"anomaly_vfm", "subspace_ad"}
    assert state["expert_score"] == pytest.approx(logistic(sum(zs.values()) / 2))
    expected = fuse(state["direct_score"], state["refute_score"], 0.3, state["expert_score"], DEFAULT_EXPERT_WEIGHT)
    assert state["anomaly_score"] == pytest.approx(expected) and 0.0 <= state["anomaly_score"] <= 1.0
    assert state["weights"] == {"direct": 0.3, "refute": pytest.approx(0.7), "expert": 0.2}

    off = await build_pipeline().ainvoke(new_state(item.item_id), context=make_context(
        item, make_vlm("offline"), config=AgentConfig(alpha=0.3, expert_weight=0)))
    assert off["anomaly_score"] == 0.3 * off["direct_score"] + (1 - 0.3) * off["refute_score"]  # exactly the paper's
    assert (off["direct_score"], off["refute_score"]) == (state["direct_score"], state["refute_score"])
    assert off["expert_score"] == state["expert_score"] and off["weights"]["expert"] == 0.0  # still recorded

    skipped = await build_pipeline().ainvoke(new_state(item.item_id), context=make_context(
        item, make_vlm("offline"), config=AgentConfig(alpha=0.3, expert_score=False)))
    assert skipped["expert_score"] is None and skipped["weights"]["expert"] == 0.0
    assert skipped["anomaly_score"] == off["anomaly_score"]


async def test_max_turns_one_forces_commit_without_tools(small_items):
    item = _anomalous(small_items)
    ctx = make_context(item, make_vlm("offline"), config=AgentConfig(max_turns=1))
    state = await build_refutation_graph().ainvoke(new_state(item.item_id), context=ctx)
    assert state.get("tools_used", []) == []
    stages = [c["stage"] for c in state["calls"]]
    assert stages[0] == "propose" and set(stages) <= {"propose", "commit"}


async def test_dropped_tool_is_not_offered_and_custom_prompt_is_used(small_items):
    item = _anomalous(small_items)
    registry = ToolRegistry.default()
    registry.drop("side_by_side_compare")
    prompts = PromptSet.load().with_text("direct", "Custom task: $descriptor ($n_refs refs).\n"
                                         'Reply with JSON: {"image_label": "normal", "confidence": 0.5}')
    ctx = make_context(item, make_vlm("offline"), registry=registry, prompts=prompts)
    from anomalyclaw.graph.messages import direct_messages, first_refute_messages

    assert "side_by_side_compare" not in first_refute_messages(ctx)[1].content[0]["text"]
    assert direct_messages(ctx)[1].content[0]["text"].startswith("Custom task:")
    state = await build_pipeline().ainvoke(new_state(item.item_id), context=ctx)
    assert "side_by_side_compare" not in state.get("tools_used", [])


def _target_name(fn) -> str:
    """The name of the function a hand-off to a thread finally calls, through partials
    (``Context.run``, the compute slot's ``_in_slot``) and LangChain's ``run_in_executor``
    wrapper (a closure over the function)."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.args[0] if fn.func.__name__ in ("run", "_in_slot") and fn.args else fn.func
            continue
        inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        if getattr(fn, "__name__", "") == "wrapper" and inner:
            fn = inner[0]
            continue
        return getattr(fn, "__name__", repr(fn))


class _CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, naming every function handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.names: list[str] = []

    def submit(self, fn, /, *args, **kwargs):
        self.names.append(_target_name(fn))
        return super().submit(fn, *args, **kwargs)


async def test_the_graph_sends_its_own_nodes_and_the_experts_to_threads_only_for_cpu_work(small_items):
    """Each hand-off to a thread costs the event loop a wake-up: the routing node and edge run
    on the loop, and the fusion's two experts go to one compute thread together."""
    item = _anomalous(small_items)
    loop = asyncio.get_running_loop()
    executor = _CountingExecutor()
    loop.set_default_executor(executor)
    try:
        state = await build_pipeline().ainvoke(new_state(item.item_id),
                                               context=make_context(item, make_vlm("offline")))
    finally:
        executor.shutdown(wait=True)
    assert set(state["expert_z"]) == set(FUSION_EXPERTS)
    names = executor.names
    assert "select_tool" not in names and "_route" not in names, names
    assert names.count("_expert_results") == 1 and "expert_result" not in names, names
