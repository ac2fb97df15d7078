"""One VLM turn: call, parse, and the single repair retry; never raises except to stop a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel

from anomalyclaw.errors import EndpointFatalError

from .context import RunContext
from .messages import visible
from .replies import FORMATS, LETTER_STAGES, MAX_REPLY_CHARS, ReplyError, clip, parse_reply
from .vlm.seam import VLMError


@dataclass
class TurnResult:
    """A parsed reply (or None), its raw text, and what the turn cost."""

    parsed: BaseModel | None = None
    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    error: str | None = None


async def ask(run: RunContext, messages: Sequence[BaseMessage], stage: str,
              observations: Sequence[Mapping[str, Any]] = ()) -> TurnResult:
    """Send ``messages`` for ``stage``; on an unusable reply, tell the model why once and retry.

    ``observations`` (this branch's so far) go into the run's view for number-reading backends.

    Endpoint failures after their retries become ``error``; an endpoint that refuses every
    request (:class:`EndpointFatalError`) propagates so the runner can stop.
    """
    out = TurnResult()
    image_size = run.item_context.query.shape[1::-1]  # (W, H) to read pixel boxes
    view = run.view(observations)
    convo = list(messages)
    problem = ""
    for attempt in range(2):
        try:
            reply = await run.vlm.acall(visible(convo, run.config.image_history), stage=stage, view=view)
        except EndpointFatalError:
            raise
        except VLMError as exc:
            out.error = str(exc)
            return out
        call = reply.usage()
        if attempt:
            call["repair"] = True
        out.calls.append(call)
        # The whole reply is parsed; what is kept (conversation, records) is cut to a bound.
        out.text = clip(reply.text or "", MAX_REPLY_CHARS)
        try:
            out.parsed = parse_reply(stage, reply.text, image_size=image_size,
                                     max_candidates=run.config.max_candidates, prompt=prompt_text(convo),
                                     options=run.question.options if run.question else None)
            if attempt:
                out.fallbacks.append(f"{stage}: reply repaired after: {problem}")
            return out
        except ReplyError as exc:
            problem = str(exc)
            repair = "mcq_repair" if stage in LETTER_STAGES else "repair"
            convo = list(messages) + [AIMessage(content=out.text or "(empty)"),
                                      HumanMessage(content=run.prompts.render(repair, problem=problem,
                                                                              format=FORMATS[stage]))]
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
