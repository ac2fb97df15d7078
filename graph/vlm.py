"""The VLM seam: one async call signature for a real chat model and for the offline policy.

``ChatVLM`` wraps any LangChain chat model (``ChatOpenAI`` against an OpenAI-compatible endpoint
in practice): it bounds concurrent requests with one semaphore, retries 429, 5xx, timeouts and
dropped connections with exponential backoff and jitter (honouring Retry-After), stops the run
at once on 401/403/404, and measures every call (latency, tokens, request bytes, retries).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from anomalyclaw.config import EndpointConfig, redact
from anomalyclaw.errors import AnomalyClawError, EndpointFatalError


class VLMError(AnomalyClawError):
    """A request that failed after its retries (or could never succeed, such as a 400)."""


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


@runtime_checkable
class VLM(Protocol):
    """What the graphs call. ``context`` is the run context (the offline policy reads it; a
    real model sees only ``messages``)."""

    backend: str
    model: str

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, context: Any = None,
                    logprobs: bool = False) -> VLMReply: ...


def request_size(messages: Sequence[BaseMessage]) -> tuple[int, int]:
    """(bytes of the messages as the OpenAI API receives them, number of images)."""
    payload = convert_to_openai_messages(list(messages))
    images = sum(1 for m in payload if isinstance(m.get("content"), list)
                 for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")
    return len(json.dumps(payload, separators=(",", ":"))), images


_TRANSIENT = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
              openai.APITimeoutError, openai.ConflictError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    # Some gateways answer 502/503/504 with odd bodies; any 5xx is worth another try.
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status >= 500


def _retry_after(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return float(raw) / 1000.0
        except ValueError:
            return None
    raw = headers.get("retry-after")
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


@dataclass
class ChatVLM:
    """A LangChain chat model behind the :class:`VLM` seam.

    ``max_concurrency`` is THE bound on requests in flight for everything that shares this
    object (a whole run shares one); waiting for a retry does not hold a slot.
    """

    chat_model: BaseChatModel
    model: str = "unknown"
    backend: str = "openai"
    max_retries: int = 5
    backoff_max_s: float = 30.0
    max_concurrency: int = 8
    secrets: list[str] = field(default_factory=list, repr=False)
    _semaphore: asyncio.Semaphore | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._semaphore = asyncio.Semaphore(max(1, self.max_concurrency))

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc)
        backoff = wait_random_exponential(multiplier=0.5, max=self.backoff_max_s)(state)
        return min(self.backoff_max_s, hinted) if hinted is not None else backoff

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, context: Any = None,
                    logprobs: bool = False) -> VLMReply:
        nbytes, nimages = request_size(messages)
        model = self.chat_model.bind(logprobs=True, top_logprobs=5) if logprobs else self.chat_model
        attempts = 0
        start = time.perf_counter()
        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_is_transient), wait=self._wait,
                    stop=stop_after_attempt(self.max_retries + 1), reraise=True):
                with attempt:
                    attempts += 1
                    async with self._semaphore:
                        message = await model.ainvoke(list(messages))
        except _FATAL as exc:
            raise EndpointFatalError(self._describe(exc, fatal=True)) from None
        except (openai.OpenAIError, asyncio.TimeoutError) as exc:
            raise VLMError(self._describe(exc, attempts=attempts)) from None
        usage = getattr(message, "usage_metadata", None) or {}
        meta = getattr(message, "response_metadata", None) or {}
        top = None
        content = (meta.get("logprobs") or {}).get("content") if isinstance(meta.get("logprobs"), dict) else None
        if content:
            top = content[0].get("top_logprobs")
        text = message.content if isinstance(message.content, str) else "".join(
            part.get("text", "") for part in message.content if isinstance(part, dict))
        return VLMReply(text=text, stage=stage, latency_s=time.perf_counter() - start,
                        prompt_tokens=usage.get("input_tokens"), completion_tokens=usage.get("output_tokens"),
                        request_bytes=nbytes * attempts, images_sent=nimages * attempts,
                        retries=attempts - 1, top_logprobs=top)

    def _describe(self, exc: BaseException, *, fatal: bool = False, attempts: int = 1) -> str:
        status = getattr(exc, "status_code", None)
        if status:
            what = f"HTTP {status}"
        elif isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
            what = "request timed out"
        elif isinstance(exc, openai.APIConnectionError):
            what = "connection failed"
        else:
            what = type(exc).__name__
        detail = redact(str(exc), self.secrets)[:300]
        if fatal:
            hint = {401: "the API key is wrong or missing (ANOMALYCLAW_API_KEY)",
                    403: "the API key may not use this model",
                    404: f"the endpoint does not serve model {self.model!r} or the base URL is wrong"}.get(
                        status or 0, "the endpoint refuses requests")
            return f"VLM endpoint refused the request ({what}): {hint}. Detail: {detail}"
        return f"VLM request failed after {attempts} attempt(s) ({what}): {detail}"


def make_chat_model(endpoint: EndpointConfig) -> BaseChatModel:
    """``ChatOpenAI`` for an OpenAI-compatible endpoint (vLLM, a hosted API, Ollama ...).

    Retries are ours (``ChatVLM``), so the client's own are off.
    """
    from langchain_openai import ChatOpenAI

    endpoint.require()
    return ChatOpenAI(base_url=endpoint.base_url, model=endpoint.model,
                      api_key=endpoint.api_key or "EMPTY", timeout=endpoint.timeout_s, max_retries=0,
                      temperature=endpoint.temperature, max_tokens=endpoint.max_tokens)


def make_vlm(backend: str = "offline", endpoint: EndpointConfig | None = None, *,
             max_concurrency: int = 8, chat_model: BaseChatModel | None = None) -> VLM:
    """The VLM for a backend: ``offline`` (the embedded rule-based stand-in) or ``openai``.

    Pass ``chat_model`` to use any other LangChain chat model behind the same seam.
    """
    if chat_model is not None:
        name = getattr(chat_model, "model_name", None) or getattr(chat_model, "model", None) or type(chat_model).__name__
        return ChatVLM(chat_model, model=str(name), backend="langchain", max_concurrency=max_concurrency)
    if backend == "offline":
        from .offline import OfflineVLM
        return OfflineVLM()
    if backend == "openai":
        endpoint = (endpoint or EndpointConfig.from_env()).require()
        return ChatVLM(make_chat_model(endpoint), model=endpoint.model or "unknown", backend="openai",
                       max_retries=endpoint.max_retries, backoff_max_s=endpoint.backoff_max_s,
                       max_concurrency=max_concurrency, secrets=endpoint.secret_values())
    raise AnomalyClawError(f"unknown backend {backend!r}: choose offline or openai")
