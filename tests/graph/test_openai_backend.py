"""The openai backend against a local fake endpoint, through both of its clients: the real
``ChatOpenAI`` (langchain, the default) and the openai SDK (``client="sdk"``). The end-to-end
tests of a tool call also run in each tool-calling mode (``json``, ``native``, ``auto``): the
fake endpoint turns a scripted JSON action into a native tool call when the request offers
tools."""
from __future__ import annotations

import json
import math

import pytest

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.errors import EndpointFatalError
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer, reply_stage
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.scores import fuse

KEY = "sk-test-0123456789abcdef"

PROPOSE_ZOOM = json.dumps({
    "initial_score": 0.6,
    "candidates": [{"id": "c1", "description": "dark mark", "bbox": [0.2, 0.2, 0.5, 0.5]}],
    "action": {"tool": "tool_zoom_bbox", "args": {}, "candidate": "c1"}, "rationale": "zoom in"})
REFUTE_COMMIT = json.dumps({"verdicts": [{"id": "c1", "status": "refuted", "evidence": "also in reference 2"}],
                            "updated_score": 0.2, "action": {"commit": True}, "rationale": "explained"})
DIRECT_OK = json.dumps({"image_label": "normal", "confidence": 0.8, "anomaly_type": None, "evidence": "ok",
                        "bbox": None})


@pytest.fixture(params=["langchain", "sdk"])
def client(request):
    return request.param


@pytest.fixture(params=["json", "native", "auto"])
def mode(request):
    return request.param


def _vlm(server, client, **kw):
    endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key=KEY,
                                       timeout_s=kw.pop("timeout_s", 5.0), max_retries=kw.pop("max_retries", 3),
                                       backoff_max_s=0.05, client=client)
    return make_vlm("openai", endpoint, max_concurrency=4)


async def _judge(item, vlm, **config):
    ctx = make_context(item, vlm, config=AgentConfig(**config))
    return await build_pipeline().ainvoke(new_state(item.item_id), context=ctx)


@pytest.fixture
def item(small_items):
    return next(it for it in small_items if it.label == 1)


async def test_tool_call_with_repaired_name(item, client, mode):
    with FakeVLMServer(api_key=KEY, script={"propose": [PROPOSE_ZOOM], "refute": [REFUTE_COMMIT],
                                            "direct": [DIRECT_OK]}, record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client), tool_calling=mode)
    assert state["tool_calling"] == ("json" if mode == "json" else "native")
    assert server.stats.tool_calls == (0 if mode == "json" else 1)
    assert state["tools_used"] == ["region_zoom"]
    assert any("repaired" in f for f in state["fallbacks"])
    assert state["refute_score"] == pytest.approx(0.2) and state["direct_score"] == pytest.approx(0.2)
    assert server.stats.stages == {"propose": 1, "refute": 1, "direct": 1}
    # the candidate's bbox was filled in for the zoom, and the zoom's images reached the model
    refute_body = next(b for b in server.bodies if reply_stage(b) == "refute")
    images = [p for p in refute_body["messages"][-1]["content"] if p.get("type") == "image_url"]
    assert images and images[0]["image_url"]["url"].startswith("data:image/")


async def test_repair_retry_then_success(item, client, mode):
    with FakeVLMServer(api_key=KEY, script={"propose": ["I think it is fine.", PROPOSE_ZOOM],
                                            "refute": [REFUTE_COMMIT], "direct": ['{"image_label": "normal"',
                                                                                  DIRECT_OK]}) as server:
        state = await _judge(item, _vlm(server, client), tool_calling=mode)
    assert state["tools_used"] == ["region_zoom"]
    assert state["refute_score"] == pytest.approx(0.2) and state["direct_score"] == pytest.approx(0.2)
    assert any("repaired after: the reply holds no JSON object" in f for f in state["fallbacks"])
    assert any("cut off" in f for f in state["direct_fallbacks"])
    assert sum(1 for c in state["calls"] if c.get("repair")) == 1


async def test_429_then_success_counts_retries(item, client):
    with FakeVLMServer(api_key=KEY, script={"direct": ["!429_retry_after", "!429", DIRECT_OK]}) as server:
        state = await _judge(item, _vlm(server, client))
    assert state["direct_calls"][0]["retries"] == 2
    assert state["direct_score"] == pytest.approx(0.2)


async def test_500_storm_fails_the_branch_not_the_item(item, client):
    storm = ["!500"] * 10
    with FakeVLMServer(api_key=KEY, script={"direct": storm}) as server:
        state = await _judge(item, _vlm(server, client, max_retries=2))
    assert state["direct_score"] is None and "HTTP 500" in state["direct_error"]
    assert state["refute_score"] is not None
    # The surviving branch stands in for the blend; the expert term is fused on top as usual.
    assert state["anomaly_score"] == fuse(None, state["refute_score"], 0.5, state["expert_score"],
                                          state["weights"]["expert"])


async def test_timeout_is_retried_then_reported(item, client):
    with FakeVLMServer(api_key=KEY, script={"direct": ["!timeout", "!timeout"]}, hang_s=3) as server:
        state = await _judge(item, _vlm(server, client, timeout_s=0.5, max_retries=1))
    assert state["direct_score"] is None and "request timed out" in state["direct_error"]


async def test_401_stops_with_a_clear_message_and_no_key(item, client):
    with FakeVLMServer(api_key="sk-the-right-one") as server:
        with pytest.raises(EndpointFatalError) as err:
            await _judge(item, _vlm(server, client))
    assert "HTTP 401" in str(err.value) and "API key" in str(err.value)
    assert KEY not in str(err.value)


async def test_unknown_model_is_404_fatal(item, client):
    with FakeVLMServer(api_key=KEY, models=["other-model"]) as server:
        with pytest.raises(EndpointFatalError, match="does not serve model 'fake-vlm'"):
            await _judge(item, _vlm(server, client))


async def test_unknown_tool_becomes_an_observation_listing_valid_names(item, client, mode):
    bad = json.dumps({"initial_score": 0.5, "candidates": [{"id": "c1", "description": "x"}],
                      "action": {"tool": "magic_detector", "args": {}}})
    with FakeVLMServer(api_key=KEY, script={"propose": [bad], "refute": [REFUTE_COMMIT]},
                       record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client), tool_calling=mode)
    obs = state["observations"][0]
    assert not obs["ok"] and "unknown tool 'magic_detector'" in obs["text"] and "side_by_side_compare" in obs["text"]
    assert state.get("tools_used", []) == []
    assert state["refute_score"] == pytest.approx(0.2)


async def test_logprob_direct_score(item, client):
    with FakeVLMServer(api_key=KEY, script={"logprob": ["anomalous"]}) as server:
        state = await _judge(item, _vlm(server, client), direct_score="logprob")
    assert state["direct_reply"]["mode"] == "logprob"
    expected = math.exp(-0.22) / (math.exp(-0.22) + math.exp(-1.6))  # the fake's two top tokens
    assert state["direct_score"] == pytest.approx(expected)


async def test_image_history_once_sends_fewer_bytes(item, client):
    sizes = {}
    for policy in ("once", "all"):
        with FakeVLMServer(api_key=KEY, script={"propose": [PROPOSE_ZOOM], "refute": [REFUTE_COMMIT]}) as server:
            state = await _judge(item, _vlm(server, client), image_history=policy)
        sizes[policy] = sum(c["request_bytes"] for c in state["calls"])
    assert sizes["once"] < sizes["all"]


def test_the_default_client_is_chatopenai(item):
    from langchain_openai import ChatOpenAI

    from anomalyclaw.graph.vlm import ChatVLM, OpenAIVLM

    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m")
    vlm = make_vlm("openai", endpoint)
    assert isinstance(vlm, ChatVLM) and isinstance(vlm.chat_model, ChatOpenAI) and vlm.backend == "openai"
    assert isinstance(make_vlm("openai", EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", client="sdk")),
                      OpenAIVLM)
    assert EndpointConfig.from_env(env={"ANOMALYCLAW_CLIENT": "sdk"}).client == "sdk"
    with pytest.raises(Exception, match="unknown client 'curl'"):
        EndpointConfig(client="curl")


def test_both_clients_ride_aiohttp_unless_told_httpx():
    from anomalyclaw.graph.vlm.endpoint import BoundedAsyncClient, BoundedHttpxClient, make_openai_client

    def http_client(**kw):
        endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", **kw)
        vlm = make_vlm("openai", endpoint)
        return vlm.chat_model.http_async_client if kw.get("client", "langchain") == "langchain" \
            else make_openai_client(endpoint)._client

    assert type(http_client()) is BoundedAsyncClient and type(http_client(client="sdk")) is BoundedAsyncClient
    assert type(http_client(transport="httpx")) is BoundedHttpxClient
    assert type(http_client(client="sdk", transport="httpx")) is BoundedHttpxClient
    assert EndpointConfig.from_env(env={"ANOMALYCLAW_TRANSPORT": "httpx"}).transport == "httpx"
    with pytest.raises(Exception, match="unknown transport 'curl' \\(ANOMALYCLAW_TRANSPORT\\)"):
        EndpointConfig.from_env(env={"ANOMALYCLAW_TRANSPORT": "curl"})


def test_a_loop_that_ends_closes_the_clients_nobody_closed(client):
    """``asyncio.run(vlm.acall(...))`` with no ``aclose``: the loop's shutdown closes its
    sessions, so none is collected open (aiohttp warns of each such one, and its sockets stay
    open until then)."""
    import asyncio
    import gc
    import warnings

    from langchain_core.messages import HumanMessage

    with FakeVLMServer(api_key=KEY, script=["one", "two"]) as server:
        vlm = _vlm(server, client)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            texts = [asyncio.run(vlm.acall([HumanMessage("hi")], stage="direct")).text for _ in range(2)]
            del vlm
            gc.collect()
    assert texts == ["one", "two"]
    assert not [w for w in caught if "Unclosed" in str(w.message)], [str(w.message) for w in caught]


def test_one_vlm_serves_one_event_loop_after_another(client):
    """A notebook or a script may call ``asyncio.run`` (``run_items``) more than once with the
    same VLM: pooled connections of a closed loop must not be reused."""
    import asyncio

    from langchain_core.messages import HumanMessage

    with FakeVLMServer(api_key=KEY, script=["one", "two", "three"]) as server:
        vlm = _vlm(server, client)
        texts = [asyncio.run(vlm.acall([HumanMessage("hi")], stage="direct")).text for _ in range(2)]

        async def call_then_close():
            try:
                return (await vlm.acall([HumanMessage("hi")], stage="direct")).text
            finally:
                await vlm.aclose()

        texts.append(asyncio.run(call_then_close()))
    assert texts == ["one", "two", "three"]


async def test_request_bytes_are_the_bytes_the_endpoint_received(item, client):
    """ChatOpenAI posts the body it serialised once (PreparedCompletions): its length is what
    the record reports, and the endpoint read exactly that many bytes."""
    with FakeVLMServer(api_key=KEY, script={"propose": [PROPOSE_ZOOM], "refute": [REFUTE_COMMIT]},
                       record_bodies=True) as server:
        state = await _judge(item, _vlm(server, client))
    calls = state["calls"] + state["direct_calls"]
    assert sum(c["request_bytes"] for c in calls) == server.stats.bytes_in
    assert all(c["images_sent"] >= 1 for c in calls if c["stage"] in ("propose", "direct"))
    first = next(b for b in server.bodies if reply_stage(b) == "propose")
    assert first["model"] == "fake-vlm" and first["temperature"] == 0.0
    assert 1024 in (first.get("max_tokens"), first.get("max_completion_tokens"))


def test_langchain_block_types_are_remembered_not_recomputed():
    from langchain_core.messages import content as lc_content

    from anomalyclaw.graph.vlm.endpoint import _cache_langchain_block_types

    _cache_langchain_block_types()
    fn = lc_content._get_data_content_block_types
    assert fn() == fn.__wrapped__() and "image" in fn()
    assert lc_content.is_data_content_block({"type": "image", "url": "https://x/y.png"})
    assert not lc_content.is_data_content_block({"type": "image_url", "image_url": {"url": "data:,"}})


def test_every_client_shares_one_tls_context_until_the_ca_variables_change(monkeypatch, tmp_path):
    """Reading the CA store is paid once per process, not per client (one per replica per event
    loop); SSL_CERT_FILE set later still takes effect, as it would for a fresh httpx client."""
    import os
    import shutil
    import ssl

    from anomalyclaw.graph.vlm.endpoint import _http_client, _tls_context, make_openai_client

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = _tls_context()
    assert isinstance(first, ssl.SSLContext) and first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    for kw in ({}, {"transport": "httpx"}, {"client": "sdk"}):
        endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", **kw)
        transport = _http_client(endpoint)._transport
        context = getattr(transport, "ssl_context", None) or transport._pool._ssl_context
        assert context is first
    assert make_openai_client(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"))._client._transport.ssl_context \
        is first
    bundle = ssl.get_default_verify_paths().openssl_cafile
    if not bundle or not os.path.isfile(bundle):
        pytest.skip("no system CA bundle to point SSL_CERT_FILE at")
    monkeypatch.setenv("SSL_CERT_FILE", str(shutil.copy(bundle, tmp_path / "ca.pem")))
    assert _tls_context() is not first and _tls_context() is _tls_context()


def test_runners_share_one_compiled_pipeline(tmp_path):
    from anomalyclaw.eval.running.mcqa import McqRunner
    from anomalyclaw.eval.running.runner import Runner
    from anomalyclaw.graph.pipeline import shared_pipeline

    vlm = make_vlm("offline")
    one, two = Runner(vlm, out_dir=tmp_path / "a"), Runner(vlm, out_dir=tmp_path / "b")
    assert one.graph is two.graph is shared_pipeline() and one.graph.checkpointer is None
    assert McqRunner(vlm, out_dir=tmp_path / "c").graph is shared_pipeline("mcqa") is not shared_pipeline()
    assert build_pipeline() is not shared_pipeline()  # build_pipeline stays the fresh one to change


async def test_chatopenai_reads_the_reply_as_a_plain_dict(item):
    """PreparedCompletions hands ChatOpenAI the reply's JSON object, not a typed ChatCompletion;
    the text, token counts, message id and log-probs come through all the same."""
    from langchain_core.messages import HumanMessage

    from anomalyclaw.graph.vlm.endpoint import PreparedCompletions

    with FakeVLMServer(api_key=KEY, script=["hello", "hello"]) as server:
        vlm = _vlm(server, "langchain")
        completions = vlm.chat_model.async_client
        assert isinstance(completions, PreparedCompletions)
        raw = await completions.with_raw_response.create(model="fake-vlm", messages=[{"role": "user", "content": "hi"}])
        body = raw.parse()
        assert type(body) is dict and body["choices"][0]["message"]["content"] == "hello"
        reply = await vlm.acall([HumanMessage("hi")], stage="direct", logprobs=True)
        await vlm.aclose()
    assert reply.text == "hello" and reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.message_id and reply.top_logprobs
