"""The LangGraph streaming paths a notebook user takes, with the default ``ChatOpenAI`` client
against the local endpoint (which streams server-sent events when asked): ``astream_events``,
``stream_mode="messages"`` (the model's replies, streamed, each once), and the project's own
``stream_mode="custom"`` events."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.events import emit
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.direct import build_direct_graph
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.replies import parse_reply
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.stream import format_event, format_update
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer


@pytest.fixture
def item(small_items):
    return next(it for it in small_items if it.label == 1)


def _chat_vlm(server):
    return make_vlm("openai", EndpointConfig(base_url=server.base_url, model="fake-vlm", timeout_s=5.0,
                                             max_retries=2, backoff_max_s=0.05))


async def test_astream_events_with_chatopenai(item):
    counts: dict[str, int] = {}
    ends = []
    with FakeVLMServer() as server:
        ctx = make_context(item, _chat_vlm(server))
        async for ev in build_pipeline().astream_events(new_state(item.item_id), context=ctx, version="v2"):
            counts[ev["event"]] = counts.get(ev["event"], 0) + 1
            if ev["event"] == "on_chat_model_end":
                ends.append(ev)
            if ev["event"] == "on_chain_end" and ev["name"] == "anomalyclaw":
                final = ev["data"]["output"]
    assert server.stats.streamed == server.stats.requests == 3  # direct, propose, refute, all streamed
    assert counts["on_chat_model_start"] == counts["on_chat_model_end"] == 3
    assert counts["on_chat_model_stream"] >= 9
    stages = sorted(e["metadata"]["langgraph_node"] for e in ends)
    assert stages == ["direct", "propose", "refute"]
    for e in ends:  # each model reply parses as its stage's reply
        parse_reply(e["metadata"]["langgraph_node"], e["data"]["output"].content)
    assert 0 <= final["anomaly_score"] <= 1 and final["tools_used"] == ["side_by_side_compare"]
    # token counts arrive with the stream (stream_options.include_usage)
    assert all(c["prompt_tokens"] and c["completion_tokens"] for c in final["calls"] + final["direct_calls"])


@pytest.mark.parametrize("mode", ["json", "native"])
async def test_messages_mode_carries_the_models_replies_once(item, mode):
    chunks: dict[str, list] = {}
    whole = []
    with FakeVLMServer() as server:
        ctx = make_context(item, _chat_vlm(server), config=AgentConfig(tool_calling=mode))
        graph = build_pipeline()
        async for msg, meta in graph.astream(new_state(item.item_id), context=ctx, stream_mode="messages"):
            if type(msg).__name__ == "AIMessageChunk":
                chunks.setdefault(msg.id, []).append((meta["langgraph_node"], msg))
            else:
                whole.append(msg)
    assert server.stats.streamed == 3
    replies = {}
    for parts in chunks.values():
        node = parts[0][0]
        merged = parts[0][1]
        for _, m in parts[1:]:
            merged = merged + m
        replies[node] = merged
    assert sorted(replies) == ["direct", "propose", "refute"]
    for node, merged in replies.items():
        parse_reply(node, merged.content)
    if mode == "native":  # the tool call arrives streamed, in pieces, and is whole at the end
        assert [tc["name"] for tc in replies["propose"].tool_calls] == ["side_by_side_compare"]
        assert replies["propose"].tool_calls[0]["args"] == {"bbox": [0.25, 0.25, 0.75, 0.75]}
    # the prompts come as whole messages; a reply is not repeated from the state after its stream
    assert not [m for m in whole if type(m).__name__ == "AIMessage"]
    assert any(type(m).__name__ == "HumanMessage" for m in whole)


async def test_custom_events_show_tools_and_requests(item):
    with FakeVLMServer(script={"direct": ["!429", "not json at all"]}) as server:
        ctx = make_context(item, _chat_vlm(server))
        events = [e async for e in build_pipeline().astream(new_state(item.item_id), context=ctx,
                                                             stream_mode="custom")]
    kinds = [e["event"] for e in events]
    assert {"tool_start", "tool_end", "vlm_request", "vlm_reply", "vlm_repair", "vlm_retry"} <= set(kinds)
    end = next(e for e in events if e["event"] == "tool_end")
    assert end["tool"] == "side_by_side_compare" and end["ok"] and end["latency_s"] > 0 and end["images"]
    assert kinds.index("tool_start") < kinds.index("tool_end")
    replies = [e for e in events if e["event"] == "vlm_reply"]
    assert {e["stage"] for e in replies} == {"direct", "propose", "refute"}
    assert all(e["request_bytes"] > 0 and e["prompt_tokens"] for e in replies)
    retry = next(e for e in events if e["event"] == "vlm_retry")
    assert retry["stage"] == "direct" and "HTTP 429" in retry["reason"]
    assert next(e for e in events if e["event"] == "vlm_repair")["stage"] == "direct"
    json.dumps(events)  # plain data, as a notebook or a server would forward it


async def test_custom_events_offline_and_no_op_outside_a_graph(small_items):
    from anomalyclaw.tools.item_context import ItemContext
    from anomalyclaw.tools.registry import ToolRegistry

    emit("tool_start", tool="x")  # outside any graph run: nothing happens, nothing raises
    item = small_items[0]
    obs = ToolRegistry.default().run("anomaly_vfm_score", {}, ItemContext(item))
    assert obs.ok
    ctx = make_context(item, make_vlm("offline"))
    kinds, lines = [], []
    async for mode, chunk in build_pipeline().astream(new_state(item.item_id), context=ctx,
                                                      stream_mode=["updates", "custom"]):
        if mode == "custom":
            kinds.append(chunk["event"])
            lines.append(format_event(chunk))
        else:
            raw = len(repr(chunk))
            text = format_update(chunk)
            assert len(text) < 2000 and len(text) < raw
            lines.append(text)
    assert kinds.count("vlm_request") == kinds.count("vlm_reply") >= 2
    assert kinds.count("tool_start") == kinds.count("tool_end")
    ctx = make_context(item, make_vlm("offline"), config=AgentConfig(direct_score="logprob"))
    logprob = [e async for e in build_direct_graph().astream(new_state(item.item_id), context=ctx,
                                                              stream_mode="custom")]
    assert [(e["event"], e["stage"]) for e in logprob] == [("vlm_request", "direct_logprob"),
                                                          ("vlm_reply", "direct_logprob")]
    printed = "\n".join(lines)
    for node in ("direct:", "propose:", "commit", "fuse: anomaly score"):
        assert node in printed
    assert "base64" not in printed and "data:image" not in printed
    assert format_update(("ns", {"custom_node": {"x": b"123", "url": "data:image/png;base64,AAAA"}})) == \
        "custom_node: x=<3 bytes>, url=<image/png data URL, 0 KB>"
