"""One VLM turn: call, parse, and the single repair retry; never raises except to stop a run.

Inside a LangGraph run each turn is also ``stream_mode="custom"`` events: ``vlm_request`` as a
request goes out, ``vlm_reply`` with its latency, tokens and bytes, ``vlm_repair`` when the reply
needs the repair retry, ``vlm_error`` when the endpoint failed.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel

from anomalyclaw.errors import EndpointFatalError
from anomalyclaw.events import emit

from .context import RunContext
from .messages import visible
from .replies import LETTER_STAGES, MAX_REPLY_CHARS, ReplyError, clip, parse_reply, reply_format
from .vlm.seam import ToolsUnsupportedError, VLMError, VLMReply


@dataclass
class TurnResult:
    """A parsed reply (or None), its raw text, and what the turn cost."""

    parsed: BaseModel | None = None
    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    error: str | None = None
    tool_call: dict[str, Any] | None = None
    """Native tool calling: the reply's first tool call (``{"id", "name", "args", "error"}``)."""
    tools_unsupported: str | None = None
    """Native tool calling: why the endpoint refused the request's tools."""
    message_id: str | None = None


async def ask(run: RunContext, messages: Sequence[BaseMessage], stage: str,
              observations: Sequence[Mapping[str, Any]] = (), *,
              tools: Sequence[Mapping[str, Any]] | None = None) -> TurnResult:
    """Send ``messages`` for ``stage``; on an unusable reply, tell the model why once and retry.

    ``observations`` (this branch's so far) go into the run's view for number-reading backends.
    ``tools`` (function schemas) asks for native tool calling: the reply's first tool call is
    the action, parsed with the reply's JSON text.

    Endpoint failures after their retries become ``error``; an endpoint that refuses every
    request (:class:`EndpointFatalError`) propagates so the runner can stop.
    """
    out = TurnResult()
    image_size = run.item_context.query.shape[1::-1]  # (W, H) to read pixel boxes
    view = run.view(observations)
    convo = list(messages)
    problem = ""
    item_id = run.item.item_id
    for attempt in range(2):
        emit("vlm_request", item_id=item_id, stage=stage, repair=bool(attempt), tools=len(tools or ()))
        try:
            reply = await run.vlm.acall(visible(convo, run.config.image_history), stage=stage, view=view,
                                        **({"tools": tools} if tools else {}))
        except EndpointFatalError:
            raise
        except VLMError as exc:
            out.error = str(exc)
            if isinstance(exc, ToolsUnsupportedError):
                out.tools_unsupported = str(exc)
            emit("vlm_error", item_id=item_id, stage=stage, error=out.error[:300])
            return out
        call = reply.usage()
        if attempt:
            call["repair"] = True
        out.calls.append(call)
        emit("vlm_reply", item_id=item_id, **call)
        # The whole reply is parsed; what is kept (conversation, records) is cut to a bound.
        out.text = clip(reply.text or "", MAX_REPLY_CHARS)
        out.message_id = reply.message_id
        out.tool_call = _first_call(reply, stage, out.fallbacks) if tools else None
        try:
            out.parsed = parse_reply(stage, reply.text, image_size=image_size,
                                     max_candidates=run.config.max_candidates, prompt=prompt_text(convo),
                                     options=run.question.options if run.question else None,
                                     tool_call=out.tool_call)
            if attempt:
                out.fallbacks.append(f"{stage}: reply repaired after: {problem}")
            return out
        except ReplyError as exc:
            problem = str(exc)
            emit("vlm_repair", item_id=item_id, stage=stage, problem=problem)
            repair = "mcq_repair" if stage in LETTER_STAGES else "repair"
            convo = list(messages) + [AIMessage(content=out.text or "(empty)"),
                                      HumanMessage(content=run.prompts.render(
                                          repair, problem=problem, format=reply_format(stage, bool(tools))))]
    out.error = f"{stage}: unusable reply after one repair retry ({problem})"
    return out


def prompt_text(messages: Sequence[BaseMessage]) -> str:
    """The text the model was sent in ``messages`` (system and user turns, not its own replies
    and not images): what a reply that merely echoes its prompt repeats."""
    parts: list[str] = []
    for m in messages:
        if isinstance(m, AIMessage):
            continue
        content = m.content
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            parts += [p for p in content if isinstance(p, str)]
    return "\n".join(parts)


def _first_call(reply: VLMReply, stage: str, fallbacks: list[str]) -> dict[str, Any] | None:
    """The tool call a turn acts on: the first (one tool per turn); an id is made up when the
    endpoint sent none."""
    calls = list(reply.tool_calls or ())
    if not calls:
        return None
    if len(calls) > 1:
        fallbacks.append(f"{stage}: {len(calls)} tool calls in one reply; only the first "
                         f"({calls[0]['name']}) was run (one tool per turn)")
    first = dict(calls[0])
    first["id"] = first.get("id") or f"call_{uuid.uuid4().hex[:12]}"
    return first
