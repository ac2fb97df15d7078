"""The VLM seam: what the graphs call, what a call returns, and how a call fails.

A backend answers ``acall(messages, stage=..., view=...)`` with a :class:`VLMReply`. ``messages``
are what a chat model sees; ``view`` is an explicit, typed view of the run for backends that
decide from numbers instead of pixels (the offline policy). A real model ignores it.
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

    def usage(self) -> dict[str, Any]:
        return {"stage": self.stage, "latency_s": round(self.latency_s, 4), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "request_bytes": self.request_bytes,
                "images_sent": self.images_sent, "retries": self.retries}


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
                    logprobs: bool = False) -> VLMReply: ...


def count_images(payload: list[dict[str, Any]]) -> int:
    """Image parts in OpenAI-format messages."""
    return sum(1 for m in payload if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")


def request_size(messages: Sequence[BaseMessage]) -> tuple[int, int]:
    """(bytes of the messages as the OpenAI API receives them, number of images)."""
    payload = convert_to_openai_messages(list(messages))
    return len(json.dumps(payload, separators=(",", ":"))), count_images(payload)
