"""The standing adversarial suite, endpoints (issue 16): one test per kind of hostile reply,
through both clients (ChatOpenAI and the openai SDK), and the default client on both HTTP
transports (aiohttp, httpx), against the loopback fake server. Each
asserts what the user sees (a retry, a repair note, a branch error naming the cause) and that
nothing finished is lost (the other item, and the other branch, keep their scores)."""
from __future__ import annotations

import json
import time

import pytest
from langchain_core.messages import HumanMessage

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.eval.running.records import RECORDS_FILE, Record
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.replies import ReplyError, parse_reply
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import HOSTILE, FakeVLMServer
from anomalyclaw.graph.vlm.seam import VLMError

FAST = AgentConfig(expert_score=False)
PROMPT = 'Judge the image. Answer with {"image_label": "normal" | "anomalous", "confidence": <0..1>}'

#: kind -> (the server's fault, what happens to one such reply, what the user reads when every
#: attempt gets it). "retried": another attempt, counted in the call's ``retries``; "repaired":
#: the repair prompt, noted in ``fallbacks``; "read": the reply is read as it is.
KINDS = {
    "never_answers": ("timeout", "retried", "request timed out"),
    "slow_drip": ("slow_drip", "retried", "request timed out"),
    "reply_50_mb": ("huge", "retried", "byte bound"),
    "choices_empty": ("no_choices", "retried", "not a chat completion"),
    "content_null": ("null_content", "repaired", "the reply was empty"),
    "content_parts": ("parts", "read", None),
    "tool_calls_not_content": ("tool_calls", "read", None),
    "error_with_200": ("error_200", "retried", "model overloaded"),
    "sse_not_json": ("sse", "retried", "event stream"),
    "redirect": ("redirect", "read", None),
    "corrupt_gzip": ("bad_gzip", "retried", "compressed body is corrupt"),
    "deep_nesting": ("deep", "retried", "not a chat completion"),
    "think_preamble": ("think", "read", None),
    "echoes_prompt": ("echo", "repaired", "repeats JSON from the prompt"),
}
RETRIED = [k for k, (_, how, _) in KINDS.items() if how == "retried"]


def test_every_hostile_fault_of_the_server_is_covered():
    assert {fault for fault, _, _ in KINDS.values()} | {"string_tokens"} == set(HOSTILE) | {"timeout"}


def _vlm(server: FakeVLMServer, client: str, *, timeout_s: float = 2.0, max_retries: int = 2,
         transport: str = "aiohttp"):
    endpoint = EndpointConfig(base_url=server.base_url, model="fake-vlm", timeout_s=timeout_s,
                              max_retries=max_retries, backoff_max_s=0.02, client=client, transport=transport)
    return make_vlm("openai", endpoint)


def _server(script, **kw) -> FakeVLMServer:
    return FakeVLMServer(script=script, hang_s=10.0, drip_s=0.3, **kw)


# ---------------------------------------------------------------- one request, both clients
@pytest.fixture(scope="module")
def clean_replies() -> dict[str, str]:
    """The fault-free reply to PROMPT through each client (the server's replies are a hash of the
    request body, which each client serialises its own way)."""
    import asyncio

    async def ask(client: str) -> str:
        with FakeVLMServer() as server:
            return (await _vlm(server, client).acall([HumanMessage(PROMPT)], stage="direct")).text

    return {client: asyncio.run(ask(client)) for client in ("langchain", "sdk")}


@pytest.mark.parametrize("client,transport", [("langchain", "aiohttp"), ("sdk", "aiohttp"), ("langchain", "httpx")])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_one_hostile_reply(kind, client, transport, clean_replies):
    fault, how, phrase = KINDS[kind]
    with _server([f"!{fault}", "fine"] if how == "retried" else [f"!{fault}"]) as server:
        reply = await _vlm(server, client, transport=transport).acall([HumanMessage(PROMPT)], stage="direct")
    assert server.stats.faults[fault] == 1
    if how == "retried":
        assert reply.text == "fine" and reply.retries == 1
        return
    assert reply.retries == 0
    if how == "repaired":
        with pytest.raises(ReplyError, match=phrase):
            parse_reply("direct", reply.text, prompt=PROMPT)
        return
    # Read as the reply it carries: a think block's draft (the other label) is not what is read.
    assert parse_reply("direct", reply.text, prompt=PROMPT) == parse_reply("direct", clean_replies[client])


@pytest.mark.parametrize("client", ["langchain", "sdk"])
@pytest.mark.parametrize("kind", RETRIED)
async def test_a_hostile_endpoint_that_never_relents_is_named_within_the_deadline(kind, client):
    """Every attempt gets the fault: the call fails after its retries with a message that names
    the cause, in bounded time (the deadline is total: a dripped reply is cut like a hang)."""
    fault, _, phrase = KINDS[kind]
    deadline = 0.5 if phrase == "request timed out" else 10.0  # the others must fail on their own
    with _server([f"!{fault}"] * 3) as server:
        start = time.perf_counter()
        with pytest.raises(VLMError, match=phrase) as err:
            await _vlm(server, client, timeout_s=deadline, max_retries=1).acall([HumanMessage(PROMPT)], stage="direct")
        elapsed = time.perf_counter() - start
    assert "after 2 attempt(s)" in str(err.value), str(err.value)
    assert deadline > 1 or elapsed < 3.0, elapsed  # two attempts cut at 0.5 s each, whatever the drip


# ------------------------------------------------------------------ whole runs: the records
def _records(out) -> dict[str, Record]:
    lines = (out / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    return {r.item_id: r for r in (Record.model_validate(json.loads(line)) for line in lines)}


@pytest.fixture(scope="module")
def two_items(small_items):
    return [small_items[0], small_items[3]]


async def _run(items, out, script, client="langchain", **kw):
    """A run judging one item after the other, so the script's faults reach them in order."""
    with _server(script) as server:
        runner = Runner(_vlm(server, client, **kw), out_dir=out, progress=False, config=FAST, item_concurrency=1)
        summary = await runner.run(items)
    return summary, _records(out)


@pytest.fixture(scope="module")
def clean_scores(two_items, tmp_path_factory):
    import asyncio

    out = {}
    for client in ("langchain", "sdk"):
        _, records = asyncio.run(_run(two_items, tmp_path_factory.mktemp(f"clean_{client}"), {}, client))
        out[client] = {i: (r.direct_score, r.refute_score) for i, r in records.items()}
    return out


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_run_through_a_hostile_endpoint_loses_nothing(kind, two_items, clean_scores, tmp_path):
    """The first item's direct branch gets the fault on every attempt (its retry or its repair):
    its record says why that branch has no score, and keeps the refutation's; the second item
    gets it once and is judged (retried, repaired or read as it is). Nothing else changes."""
    fault, how, phrase = KINDS[kind]
    first, second = (it.item_id for it in two_items)
    script = [f"!{fault}"] * (2 if how == "read" else 3)
    summary, records = await _run(two_items, tmp_path, {"direct": script}, max_retries=1)
    assert set(records) == {first, second} and summary.n_errors == 0
    lost, judged = records[first], records[second]
    direct_calls = [c for c in judged.usage["calls"] if c.get("branch") == "direct"]
    if how == "read":
        assert summary.n_partial == 0 and not lost.fallbacks and not judged.fallbacks
        assert all(c["retries"] == 0 for c in direct_calls)
    else:
        assert summary.n_partial == 1 and lost.direct_score is None and "internal" not in lost.direct_error
        assert phrase in lost.direct_error, lost.direct_error
        assert lost.refute_score == clean_scores["langchain"][first][1] == lost.anomaly_score
        if how == "retried":
            assert [c["retries"] for c in direct_calls] == [1] and not judged.fallbacks
        else:
            assert len(judged.fallbacks) == 1 and phrase in judged.fallbacks[0] and "reply repaired" in judged.fallbacks[0]
    expected = clean_scores["langchain"]
    for item_id, rec in records.items():
        assert rec.error is None and rec.refute_score == expected[item_id][1]
        if rec.direct_score is not None and not rec.fallbacks:  # read or retried: as without the fault
            assert rec.direct_score == expected[item_id][0]


async def test_token_counts_as_strings_cost_nothing(two_items, clean_scores, tmp_path):
    """Issue 17 item 12: ``"prompt_tokens": "12"`` through --client sdk raised TypeError after
    both branches were scored; now the counts are read as numbers."""
    summary, records = await _run(two_items, tmp_path, {"direct": ["!string_tokens"], "propose": ["!string_tokens"]},
                                  client="sdk")
    assert summary.n_errors == 0 and summary.n_partial == 0
    for item_id, rec in records.items():
        assert (rec.direct_score, rec.refute_score) == clean_scores["sdk"][item_id]
        assert isinstance(rec.usage["prompt_tokens"], int) and rec.usage["prompt_tokens"] > 0


async def test_a_huge_rationale_is_cut_not_stored_four_times(two_items, tmp_path):
    """Issue 17 item 13: a reply's rationale went into the conversation, the history, the
    record's rationale and the direct rationale at full length (a 50 MB rationale stored four
    times, and sent back to the model every turn). Replies above the byte bound are refused;
    below it, what is kept is cut to a bound."""
    from anomalyclaw.graph.replies import MAX_FIELD_CHARS, MAX_REPLY_CHARS

    blob = "the surface looks fine " * 50_000  # 1.2 MB, twice in a reply: under the 4 MB bound
    propose = json.dumps({"initial_score": 0.4, "candidates": [{"id": "c1", "description": blob, "bbox": None}],
                          "action": {"commit": True}, "rationale": blob})
    direct = json.dumps({"image_label": "normal", "confidence": 0.8, "evidence": blob})
    with FakeVLMServer(script={"propose": [propose], "direct": [direct]}, record_bodies=True) as server:
        runner = Runner(_vlm(server, "langchain"), out_dir=tmp_path, progress=False, config=FAST)
        summary = await runner.run(two_items[:1])
    line = (tmp_path / RECORDS_FILE).read_text(encoding="utf-8")
    rec = Record.model_validate(json.loads(line))
    assert summary.n_errors == 0 and rec.direct_score == pytest.approx(0.2) and rec.refute_score == 0.4
    assert len(line) < 8 * MAX_FIELD_CHARS + 4 * MAX_REPLY_CHARS, len(line)
    assert "characters cut" in rec.rationale and len(rec.rationale) < MAX_FIELD_CHARS + 100
    sent = [len(json.dumps(body)) for body in server.bodies]
    assert max(sent) < 2**20  # the 2.3 MB reply is not sent back to the model
