"""The VLM seam: what the graphs call, what a call returns, and how a call fails.

A backend answers ``acall(messages, stage=..., view=...)`` with a :class:`VLMReply`. ``messages``
are what a chat model sees; ``view`` is an explicit, typed view of the run for backends that
decide from numbers instead of pixels (the offline policy). A real model ignores it. ``tools``
(OpenAI-format function schemas) asks for native tool calling: the reply's ``tool_calls`` are the
model's calls, and an endpoint that cannot take tools raises :class:`ToolsUnsupportedError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from langchain_core.messages import BaseMessage, convert_to_openai_messages

from anomalyclaw.errors import AnomalyClawError

if TYPE_CHECKING:
    from anomalyclaw.experts.base import ExpertResult
    from anomalyclaw.items import Question

#: The protocol stages a request can be for (the request header names it, see
#: :data:`STAGE_HEADER`).
STAGES = ("direct", "direct_logprob", "propose", "refute", "commit",
          "mcq_direct", "mcq_propose", "mcq_refute", "mcq_commit")
#: HTTP header that names the stage of a request, so that logs, gateways and the test server
#: can tell requests apart without reading prompts.
STAGE_HEADER = "X-AnomalyClaw-Stage"


class VLMError(AnomalyClawError):
    """A request that failed after its retries (or could never succeed, such as a 400)."""


class ToolsUnsupportedError(VLMError):
    """The endpoint refused a request because it carried ``tools`` (a vLLM started without
    ``--enable-auto-tool-choice`` answers 400): native tool calling is not available there."""


class BadResponseError(VLMError):
    """The endpoint answered 200 with a body that is not a chat completion (a gateway's HTML
    error page, a truncated body): worth another try, like a 5xx."""


@dataclass
class VLMReply:
    """One VLM call's text and what it cost."""

    text: str
    stage: str
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_bytes: int = 0
    images_sent: int = 0
    retries: int = 0
    top_logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """With ``tools`` offered: the model's calls, ``{"id", "name", "args", "error"}`` each, ``args``
    a dict (None with ``error`` saying why when the arguments were not a JSON object); else None."""
    message_id: str | None = None
    """The id of the chat model's reply message, when it has one (LangGraph's message stream
    shows each message once by id)."""

    def usage(self) -> dict[str, Any]:
        out = {"stage": self.stage, "latency_s": round(self.latency_s, 4), "prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens, "request_bytes": self.request_bytes,
               "images_sent": self.images_sent, "retries": self.retries}
        if self.tool_calls is not None:
            out["tool_calls"] = [c.get("name") for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class RunView:
    """What a backend that reads numbers may know about the item, besides the messages.

    Everything here is also in the messages a chat model receives, in words or pixels: the
    applicable tools (the prompt lists them), the expert's reading (a tool reports it) and the
    observations so far (each refute prompt quotes one).
    """

    item_id: str
    traits: frozenset[str]
    """The item's domain traits (``anomalyclaw.domains.TRAITS``)."""
    tools: tuple[str, ...]
    """Names of the tools that apply to this item, in the prompt's order."""
    max_candidates: int
    expert: Callable[[], "ExpertResult"]
    """The default expert's result on this item (computed once per item)."""
    observations: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    """This branch's tool observations so far, oldest first, as plain dicts
    (``Observation.to_state()``: ``tool``, ``ok``, ``error``, ``data`` with ``evidence``...)."""
    question: "Question | None" = None
    """The multiple-choice question being answered (``--task mcqa``): its text and options as
    the prompt shows them; never its answer, nor its MMAD type (a model sees neither)."""


@runtime_checkable
class VLM(Protocol):
    """What the graphs call: a backend name, a model name and one async call."""

    backend: str
    model: str

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, view: RunView | None = None,
                    logprobs: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> VLMReply: ...


def read_tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    """One tool call as :attr:`VLMReply.tool_calls` holds it, from the wire's name and arguments
    (a JSON string, or an already parsed dict)."""
    args, error = arguments, None
    if isinstance(arguments, str):
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            args, error = None, f"not valid JSON ({exc.msg} at position {exc.pos}): {arguments[:200]!r}"
    if error is None and not isinstance(args, dict):
        args, error = None, f"not a JSON object: {str(arguments)[:200]!r}"
    return {"id": str(call_id) if call_id else None, "name": str(name or ""), "args": args, "error": error}


def tools_size(tools: Sequence[Mapping[str, Any]] | None) -> int:
    """Bytes the ``tools`` field adds to a request body."""
    return len(json.dumps(list(tools), separators=(",", ":"))) + len(',"tools":') if tools else 0


def count_images(payload: list[dict[str, Any]]) -> int:
    """Image parts in OpenAI-format messages."""
    return sum(1 for m in payload if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")


def request_size(messages: Sequence[BaseMessage]) -> tuple[int, int]:
    """(bytes of the messages as the OpenAI API receives them, number of images)."""
    payload = convert_to_openai_messages(list(messages))
    return len(json.dumps(payload, separators=(",", ":"))), count_images(payload)
