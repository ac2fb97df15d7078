"""The direct branch: one VLM call with a generic descriptor prompt, read as a score.

Verbalized (default): score = confidence if "anomalous" else 1 - confidence. Log-prob (when the
endpoint returns token log-probabilities and the user asks for it): P("anomalous") from the
first token's top log-probs; it falls back to the verbalized reading when none come back.
"""
from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from anomalyclaw.errors import EndpointFatalError
from anomalyclaw.events import emit

from .calls import ask
from .context import RunContext, arun_context
from .messages import direct_messages, visible
from .replies import DirectReply, parse_label_logprobs
from .state import DirectState
from .vlm.seam import VLMError


async def _logprob_score(run: RunContext) -> tuple[float | None, dict[str, Any] | None, str | None]:
    messages = visible(direct_messages(run, logprob=True), run.config.image_history)
    item_id = run.item.item_id
    emit("vlm_request", item_id=item_id, stage="direct_logprob", repair=False, tools=0)
    try:
        reply = await run.vlm.acall(messages, stage="direct_logprob", view=run.view(), logprobs=True)
    except EndpointFatalError:
        raise
    except VLMError as exc:
        emit("vlm_error", item_id=item_id, stage="direct_logprob", error=str(exc)[:300])
        return None, None, str(exc)
    emit("vlm_reply", item_id=item_id, **reply.usage())
    p = parse_label_logprobs(reply.top_logprobs or [])
    return p, reply.usage(), None if p is not None else "no usable log-probs in the reply"


async def direct(state: DirectState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = await arun_context(runtime.context, state)
    update: dict[str, Any] = {"direct_calls": [], "direct_fallbacks": []}
    if run.config.direct_score == "logprob":
        p, usage, problem = await _logprob_score(run)
        if usage:
            update["direct_calls"].append(usage)
        if p is not None:
            label = "anomalous" if p >= 0.5 else "normal"
            update.update(direct_score=p, direct_label=label, direct_confidence=max(p, 1 - p),
                          direct_reply={"image_label": label, "p_anomalous": p, "mode": "logprob"})
            return update
        update["direct_fallbacks"].append(f"logprob score unavailable ({problem}); used the verbalized score")
    turn = await ask(run, direct_messages(run), "direct")
    update["direct_calls"] += turn.calls
    update["direct_fallbacks"] += turn.fallbacks
    if turn.parsed is None:
        update.update(direct_score=None, direct_error=f"direct branch produced no score: {turn.error}",
                      direct_reply={"raw": turn.text[:2000]})
        return update
    reply: DirectReply = turn.parsed  # type: ignore[assignment]
    update.update(direct_score=reply.score, direct_label=reply.image_label, direct_confidence=reply.confidence,
                  direct_reply=reply.model_dump())
    return update


def build_direct_graph(*, checkpointer: Any = None, name: str = "direct", context_schema: type = RunContext,
                       input_schema: type | None = None):
    """The one-node direct-judgment graph; run it with ``context=make_context(...)``."""
    graph = StateGraph(DirectState, context_schema=context_schema, input_schema=input_schema)
    graph.add_node("direct", direct)
    graph.add_edge(START, "direct")
    graph.add_edge("direct", END)
    return graph.compile(checkpointer=checkpointer, name=name)
