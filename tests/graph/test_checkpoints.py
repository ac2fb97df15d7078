"""Checkpointed item threads: one thread per item (``thread_config``), the history replays its
turns, a run stopped before a node resumes with a fresh context, and everything in state
serialises under LangGraph's strict msgpack (``LANGGRAPH_STRICT_MSGPACK=true``, set before
langgraph is imported, hence a child process)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from langchain_core.messages import BaseMessage
from langgraph.checkpoint.memory import InMemorySaver

from anomalyclaw.config import AgentConfig
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.pipeline import build_pipeline, thread_config
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm

PLAIN = (str, int, float, bool, type(None), bytes)


def _plain(value, where="state"):
    """Raise if ``value`` holds anything but JSON-like data, bytes and LangChain messages."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _plain(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    elif isinstance(value, BaseMessage):
        _plain(value.content, f"{where}.content")
    else:
        assert isinstance(value, PLAIN), f"{where} is a {type(value).__name__}"


@pytest.fixture
def item(small_items):
    return next(it for it in small_items if it.label == 1 and "aligned" in it.traits)


@pytest.mark.parametrize("mode", ["json", "native"])
async def test_state_is_plain_data(item, mode):
    state = await build_pipeline().ainvoke(new_state(item.item_id), context=make_context(
        item, make_vlm("offline"), config=AgentConfig(tool_calling=mode)))
    assert state["observations"] and any(isinstance(im["data"], bytes) for o in state["observations"]
                                         for im in o["images"])
    _plain(dict(state))


async def test_item_thread_history_replays_its_turns(item):
    graph = build_pipeline(checkpointer=InMemorySaver())
    config = thread_config(item)
    assert config == {"configurable": {"thread_id": item.item_id}}
    final = await graph.ainvoke(new_state(item.item_id), config, context=make_context(item, make_vlm("offline")))
    history = [s async for s in graph.aget_state_history(config)]
    steps = [s.metadata["step"] for s in history]
    assert steps == sorted(steps, reverse=True)  # newest first
    ran = [node for s in reversed(history) for node in s.next]
    turns = [s.values.get("turn") for s in reversed(history) if s.values.get("turn")]
    assert turns == sorted(turns) and turns[-1] == final["turn"]
    assert history[0].values["anomaly_score"] == final["anomaly_score"]
    # an earlier step forks with a fresh context and ends where the run ended (the offline
    # policy replays its episode from the state)
    before_refute = next(s for s in history if s.next == ("refute",))
    forked = await graph.ainvoke(None, before_refute.config, context=make_context(item, make_vlm("offline")))
    assert forked["refute_score"] == final["refute_score"]
    assert ran[:2] == ["__start__", "direct"] and {"propose", "select_tool", "observe", "refute", "commit"} <= set(ran)
    assert ran[-2:] == ["fuse", "localize"]  # the fused score, then where the anomaly is


STRICT_SCRIPT = textwrap.dedent('''
    import asyncio, logging, sys
    logging.basicConfig(level=logging.WARNING)
    from langgraph.checkpoint.serde import _msgpack
    assert _msgpack.STRICT_MSGPACK_ENABLED
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from anomalyclaw import AgentConfig, build_pipeline, load_manifest, make_context, make_vlm, new_state, thread_config

    manifest, db = sys.argv[1], sys.argv[2]
    item = next(it for it in load_manifest(manifest, split="test") if it.label == 1 and "aligned" in it.traits)

    async def main():
        for mode in ("native",):  # native state holds every kind of value json's does, plus tool messages
            config = AgentConfig(tool_calling=mode)
            fresh = lambda: make_context(item, make_vlm("offline"), config=config)
            whole = await build_pipeline().ainvoke(new_state(item.item_id), context=fresh())
            cfg = thread_config(item.item_id + "-" + mode)
            async with AsyncSqliteSaver.from_conn_string(db) as saver:
                graph = build_pipeline(checkpointer=saver)
                await graph.ainvoke(new_state(item.item_id), cfg, context=fresh(), interrupt_before=["refute"])
                assert (await graph.aget_state(cfg)).next == ("refute",)
            # a new process would do this: reopen the file, resume with a fresh context
            async with AsyncSqliteSaver.from_conn_string(db) as saver:
                graph = build_pipeline(checkpointer=saver)
                resumed = await graph.ainvoke(None, cfg, context=fresh())
            assert resumed["refute_score"] == whole["refute_score"], (resumed["refute_score"], whole["refute_score"])
            assert resumed["anomaly_score"] == whole["anomaly_score"]
            assert resumed["tools_used"] == whole["tools_used"] and resumed["tool_calling"] == mode
            assert type(resumed["observations"][0]) is dict and isinstance(resumed["observations"][0]["images"][0]["data"], bytes)
            print("resumed", mode, resumed["refute_score"], len(resumed["messages"]))

    asyncio.run(main())
''')


def test_resume_under_strict_msgpack(small_synth, tmp_path):
    env = {**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true"}
    proc = subprocess.run([sys.executable, "-c", STRICT_SCRIPT, str(small_synth), str(tmp_path / "threads.sqlite")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed") == 1
    # nothing was blocked or deserialised as an unregistered type
    for warning in ("Blocked deserialization", "Deserializing unregistered type", "not in allowed_msgpack_modules"):
        assert warning not in proc.stderr, proc.stderr[-2000:]
