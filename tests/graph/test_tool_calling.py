"""Native tool calling (``--tool-calling native|auto``) through the real clients and the local
fake endpoint: what goes over the wire, a call naming no such tool, malformed arguments, and
``auto``'s fallback when the endpoint refuses tools."""
from __future__ import annotations

import json
import logging

import pytest

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import TOOLS_UNSUPPORTED, FakeVLMServer
from anomalyclaw.scores import fuse

REFUTE_COMMIT = json.dumps({"verdicts": [{"id": "c1", "status": "refuted", "evidence": "also in reference 2"}],
                            "updated_score": 0.2, "action": {"commit": True}, "rationale": "explained"})
PROPOSE_TEXT = json.dumps({"initial_score": 0.6, "candidates": [{"id": "c1", "description": "dark mark",
                                                                 "bbox": [0.2, 0.2, 0.5, 0.5]}],
                           "candidate": "c1", "rationale": "zoom in"})


@pytest.fixture(params=["langchain", "sdk"])
def client(request):
    return request.param


@pytest.fixture
def item(small_items):
    return next(it for it in small_items if it.label == 1)


def _vlm(server, client):
    endpoint = EndpointConfig(base_url=server.base_url, model="fake-vlm", timeout_s=5.0, max_retries=2,
                              backoff_max_s=0.05, client=client)
    return make_vlm("openai", endpoint, max_concurrency=4)


async def _judge(item, vlm, mode="native", **config):
    ctx = make_context(item, vlm, config=AgentConfig(tool_calling=mode, **config))
    return await build_pipeline().ainvoke(new_state(item.item_id), context=ctx)


def _stage(body):
    from anomalyclaw.graph.vlm.fake_server import reply_stage

    return reply_stage(body)


async def test_native_sends_the_items_tools_and_answers_with_a_tool_message(item, client):
    with FakeVLMServer(record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client))
    ctx = make_context(item, make_vlm("offline"))
    applicable = list(ctx.applicable_tools())
    assert state["tool_calling"] == "native" and state["tools_used"] == ["side_by_side_compare"]
    assert server.stats.tool_calls == 1
    propose, refute = (b for b in server.bodies if b.get("tools"))
    assert [t["function"]["name"] for t in propose["tools"]] == applicable
    assert propose["tools"][0]["function"]["parameters"]["properties"]  # the pydantic schema's fields
    # the prompt lists the tools without their argument schemas: those travel as function schemas
    prompt = propose["messages"][1]["content"][0]["text"]
    assert "- side_by_side_compare:" in prompt and '"bbox"' not in prompt.split("Tools you can call")[1][:400]
    roles = [m["role"] for m in refute["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assistant, tool, user = refute["messages"][2:]
    call = assistant["tool_calls"][0]
    assert call["function"]["name"] == "side_by_side_compare" and tool["tool_call_id"] == call["id"]
    assert isinstance(tool["content"], str) and tool["content"].startswith("Compared region")
    assert any(p.get("type") == "image_url" for p in user["content"])  # the tool's images, not in the tool message
    assert "tool message above" in user["content"][0]["text"]
    # one VLM call per turn: direct, propose, refute
    assert server.stats.requests == 3 and len(state["calls"]) == 2
    assert [c["tool_calls"] for c in state["calls"]] == [["side_by_side_compare"], []]


async def test_native_unknown_tool_is_a_rejected_observation(item, client):
    script = {"propose": [{"content": PROPOSE_TEXT, "tool_calls": [{"name": "tool_domain_knowledge", "arguments": "{}"}]}],
              "refute": [REFUTE_COMMIT]}
    with FakeVLMServer(script=script, record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client))
    obs = state["observations"][0]
    assert not obs["ok"] and "unknown tool 'tool_domain_knowledge'" in obs["text"] and "side_by_side_compare" in obs["text"]
    assert state.get("tools_used", []) == []
    refute = [b for b in server.bodies if b.get("tools")][-1]
    tool = next(m for m in refute["messages"] if m["role"] == "tool")
    assert tool["content"].startswith("No tool was run: unknown tool 'tool_domain_knowledge'")
    assert state["refute_score"] == pytest.approx(0.2)


async def test_native_malformed_arguments_are_a_rejected_observation(item, client):
    script = {"propose": [{"content": PROPOSE_TEXT,
                           "tool_calls": [{"name": "region_zoom", "arguments": '{"bbox": [0.2, 0.2'}]}],
              "refute": [REFUTE_COMMIT]}
    with FakeVLMServer(script=script, record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client))
    obs = state["observations"][0]
    assert not obs["ok"] and obs["tool"] == "region_zoom" and "not valid JSON" in obs["text"]
    assert state.get("tools_used", []) == [] and state["refute_score"] == pytest.approx(0.2)
    refute = [b for b in server.bodies if b.get("tools")][-1]
    assistant = next(m for m in refute["messages"] if m["role"] == "assistant")
    # the conversation keeps the call with arguments a server can parse, and says why it did not run
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {}
    tool = next(m for m in refute["messages"] if m["role"] == "tool")
    assert "not valid JSON" in tool["content"] and tool["tool_call_id"] == assistant["tool_calls"][0]["id"]


async def test_native_arguments_that_fail_the_schema_go_through_the_guard(item, client):
    script = {"propose": [{"content": PROPOSE_TEXT,
                           "tool_calls": [{"name": "region_zoom", "arguments": '{"bbox": "left half"}'}]}],
              "refute": [REFUTE_COMMIT]}
    with FakeVLMServer(script=script) as server:
        state = await _judge(item, _vlm(server, client))
    obs = state["observations"][0]
    assert not obs["ok"] and "invalid arguments for region_zoom" in obs["text"]


async def test_native_turn_limit_answers_the_pending_call(item, client):
    """At the turn limit the model's last tool call is not run, but its call still gets a tool
    message before the forced commit (an assistant tool call must be answered)."""
    propose = json.dumps({"initial_score": 0.6, "candidates": [{"id": "c1", "description": "x", "bbox": None}],
                          "action": {"tool": "side_by_side_compare", "args": {}, "candidate": "c1"}})
    with FakeVLMServer(script={"propose": [propose]}, record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client), max_turns=1)
    assert state.get("tools_used", []) == []
    commit = next(b for b in server.bodies if _stage(b) == "commit")
    roles = [m["role"] for m in commit["messages"]]
    assert roles[-3:] == ["assistant", "tool", "user"] and "turn limit" in commit["messages"][-2]["content"]
    assert state["refute_score"] is not None


async def test_native_without_a_tool_parser_fails_the_branch_with_the_fix(item, client):
    with FakeVLMServer(tools_supported=False) as server:
        state = await _judge(item, _vlm(server, client))
    assert state.get("refute_score") is None and "--enable-auto-tool-choice" in state["refute_error"]
    assert "--tool-calling json or auto" in state["refute_error"]
    assert state["direct_score"] is not None  # the surviving branch stands in for the blend, fused as usual
    assert state["anomaly_score"] == fuse(state["direct_score"], None, 0.5, state["expert_score"],
                                          state["weights"]["expert"])


async def test_auto_falls_back_to_json_once_for_the_rest_of_the_run(small_items, client, tmp_path, caplog):
    from anomalyclaw.eval.running.records import load_records
    from anomalyclaw.eval.running.runner import Runner

    items = small_items[:4]
    with FakeVLMServer(tools_supported=False) as server:
        vlm = _vlm(server, client)
        runner = Runner(vlm, out_dir=tmp_path, config=AgentConfig(tool_calling="auto"), item_concurrency=1,
                        progress=False)
        with caplog.at_level(logging.WARNING, logger="anomalyclaw"):
            summary = await runner.run(items)
    assert server.stats.with_tools == 1  # one refused request, then JSON actions
    assert server.stats.by_status[400] == 1
    assert summary.n_errors == 0 and summary.tool_calling.startswith("auto (fell back to json:")
    assert TOOLS_UNSUPPORTED in summary.tool_calling
    warnings = [r for r in caplog.records if "JSON actions for the rest of the run" in r.getMessage()]
    assert len(warnings) == 1
    records = load_records(tmp_path)
    assert all(r.refute_score is not None for r in records)
    noted = [r for r in records if any("tool calling auto" in f for f in r.fallbacks)]
    assert len(noted) == 1
    info = json.loads(next(tmp_path.glob("run_*.json")).read_text())
    assert info["summary"]["tool_calling"] == summary.tool_calling and info["config"]["tool_calling"] == "auto"


async def test_auto_stays_native_where_tools_are_supported(item, client):
    with FakeVLMServer() as server:
        state = await _judge(item, _vlm(server, client), mode="auto")
    assert state["tool_calling"] == "native" and server.stats.tool_calls == 1


async def test_offline_backend_speaks_native_with_the_same_decisions(small_items):
    """The offline policy answers tool calls when offered tools: same tools, same scores as JSON."""
    item = next(it for it in small_items if it.label == 1 and "aligned" in it.traits)
    results = {}
    for mode in ("json", "native"):
        state = await _judge(item, make_vlm("offline"), mode=mode)
        results[mode] = (state["tools_used"], state["refute_score"], len(state["calls"]))
    assert results["json"] == results["native"]


def test_cli_run_says_how_tools_were_called(small_synth, tmp_path, capsys):
    from anomalyclaw.cli import main

    with FakeVLMServer(tools_supported=False) as server:
        run = ["run", "--manifest", str(small_synth), "--split", "test", "--limit", "2", "--backend", "openai",
               "--base-url", server.base_url, "--model", "fake-vlm", "--out", str(tmp_path / "run"), "--no-progress"]
        code = main(run + ["--tool-calling", "auto", "--json"])
        out = capsys.readouterr().out
        assert code == 0
        assert "tool calling: auto (fell back to json:" in out
        assert json.loads(out.strip().splitlines()[-1])["tool_calling"].startswith("auto (fell back to json")
        # the mode shapes the records: resuming the folder in another mode is refused, naming it
        code = main(run + ["--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "tool_calling" in err and "backend" not in err


def test_tool_calling_mode_is_validated():
    from anomalyclaw.errors import ConfigError

    with pytest.raises(ConfigError, match="tool_calling must be one of json, native, auto"):
        AgentConfig(tool_calling="functions")
