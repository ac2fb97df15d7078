"""A flaky endpoint costs items a branch or an error record, never the run (issue 5)."""
from __future__ import annotations

import json

import pytest
from langchain_core.messages import HumanMessage

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.graph.vlm.fake_server import FAULTS, FakeVLMServer
from anomalyclaw.eval.running.records import RECORDS_FILE, Record
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm

#: The expert term is not what these tests are about; leaving it out keeps them fast.
FAST = AgentConfig(expert_score=False)
TRANSPORT_FAULTS = ("500", "429", "429_retry_after", "timeout", "reset", "html")
CONTENT_FAULTS = tuple(f for f in FAULTS if f not in TRANSPORT_FAULTS)


def _vlm(server: FakeVLMServer, *, timeout_s: float = 0.5, max_retries: int = 2, concurrency: int = 8,
         client: str = "langchain", transport: str = "aiohttp"):
    endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key="sk-unused",
                                       timeout_s=timeout_s, max_retries=max_retries, backoff_max_s=0.02,
                                       client=client, transport=transport)
    return make_vlm("openai", endpoint, max_concurrency=concurrency)


def _records(out_dir) -> list[Record]:
    lines = (out_dir / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    return [Record.model_validate(json.loads(line)) for line in lines]


def _check_well_formed(records: list[Record]) -> None:
    """Each record either carries a fused score in [0, 1] or says why it has none."""
    for rec in records:
        if rec.error is not None:
            assert rec.anomaly_score is None and len(rec.error) > 20, rec.error
            continue
        assert rec.anomaly_score is not None and 0.0 <= rec.anomaly_score <= 1.0
        assert rec.direct_score is not None or rec.refute_score is not None
        if rec.direct_score is None:
            assert rec.direct_error, rec.item_id
        if rec.refute_score is None:
            assert rec.refute_error, rec.item_id


@pytest.mark.parametrize("client", ["langchain", "sdk"])
@pytest.mark.parametrize("fault", TRANSPORT_FAULTS)
async def test_transport_fault_is_retried(fault, client):
    with FakeVLMServer(script=[f"!{fault}", "fine"], hang_s=5.0) as server:
        reply = await _vlm(server, timeout_s=1.0, client=client).acall([HumanMessage("hello")], stage="direct")
    assert reply.text == "fine" and reply.retries == 1
    assert server.stats.faults == {fault: 1}


@pytest.mark.parametrize("client", ["langchain", "sdk"])
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_dropped_connection_is_named_one_on_either_transport(client, transport):
    """The SDK's aiohttp bridge raises a "timeout" for a reset connection; the user reads what
    happened, with the system's words for it, as on httpx."""
    from anomalyclaw.graph.vlm.seam import VLMError

    with FakeVLMServer(script=["!reset"] * 2) as server:
        vlm = _vlm(server, timeout_s=2.0, max_retries=1, client=client, transport=transport)
        with pytest.raises(VLMError, match=r"after 2 attempt\(s\) \(connection failed\)") as err:
            await vlm.acall([HumanMessage("hello")], stage="direct")
    assert "timed out" not in str(err.value)
    if transport == "aiohttp":
        assert "Connection reset by peer" in str(err.value)


@pytest.mark.parametrize("fault", CONTENT_FAULTS)
async def test_content_fault_is_repaired_or_named(small_items, fault):
    item = next(it for it in small_items if it.label == 1)
    with FakeVLMServer(script={"propose": [f"!{fault}"], "direct": [f"!{fault}"]}) as server:
        ctx = make_context(item, _vlm(server), config=FAST)
        state = await build_pipeline().ainvoke(new_state(item.item_id), context=ctx)
    assert 0.0 <= state["anomaly_score"] <= 1.0
    assert state["direct_score"] is not None and state["refute_score"] is not None
    notes = " ".join(state.get("fallbacks", []) + state.get("direct_fallbacks", []))
    if fault in ("empty", "cut", "prose", "bad_score", "nan_score"):
        assert "repaired" in notes  # the model was told what was wrong and answered again
    if fault == "bad_tool":
        assert "unknown tool 'tool_magic_detector'" in state["observations"][0]["text"]


async def test_run_through_a_20_percent_faulty_endpoint(small_items, tmp_path):
    with FakeVLMServer(fault_rate=0.2, hang_s=1.0, seed=5) as server:
        summary = await Runner(_vlm(server, timeout_s=0.4), out_dir=tmp_path, config=FAST,
                               progress=False).run(small_items)
    records = _records(tmp_path)
    assert sorted(r.item_id for r in records) == sorted(it.item_id for it in small_items)
    _check_well_formed(records)
    assert sum(server.stats.faults.values()) >= 5, server.stats.faults  # the run really met faults
    assert summary.fatal is None and summary.n_done == len(small_items)
    assert summary.n_errors == sum(r.error is not None for r in records)
    assert summary.n_partial == sum(r.error is None and bool(r.direct_error or r.refute_error) for r in records)


async def test_endpoint_down_gives_error_records_that_say_why(small_items, tmp_path):
    items = small_items[:4]
    with FakeVLMServer(fault_rate=1.0, faults=["500"]) as server:
        summary = await Runner(_vlm(server, max_retries=1), out_dir=tmp_path, config=FAST,
                               progress=False).run(items)
    records = _records(tmp_path)
    assert len(records) == len(items) and summary.n_errors == len(items) and summary.fatal is None
    for rec in records:
        assert rec.anomaly_score is None
        assert rec.error.startswith("both branches failed")
        assert "VLM request failed after 2 attempt(s) (HTTP 500)" in rec.error


async def test_an_unexpected_exception_costs_one_item_not_the_run(small_items, tmp_path):
    from anomalyclaw.graph.vlm.offline import OfflineVLM

    doomed = small_items[1].item_id

    class BuggyVLM(OfflineVLM):
        async def acall(self, messages, *, stage, view=None, logprobs=False):
            if view.item_id == doomed:
                raise RuntimeError("a bug in a custom backend")
            return await super().acall(messages, stage=stage, view=view, logprobs=logprobs)

    summary = await Runner(BuggyVLM(), out_dir=tmp_path, progress=False).run(small_items[:4])
    records = {r.item_id: r for r in _records(tmp_path)}
    assert len(records) == 4 and summary.n_errors == 1 and summary.fatal is None
    assert records[doomed].error == "internal: RuntimeError: a bug in a custom backend"
    assert all(r.error is None for k, r in records.items() if k != doomed)
