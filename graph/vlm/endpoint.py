"""The endpoint clients: one request discipline for every real chat model.

:class:`_EndpointVLM` holds what both clients share: a single semaphore bounds the requests in
flight; every request has one total deadline (connect, send and the whole reply: a server that
drips its reply a few bytes at a time is cut off like one that never answers); 429, 5xx,
deadlines, dropped connections and unreadable replies (not a completion, above the size bound,
nested too deeply, a corrupt compressed body, an event stream where JSON was asked) are retried
with exponential backoff and jitter (honouring Retry-After); 401/403/404 stop the run at once;
and every call is measured (latency, tokens, request bytes, images, retries). Each request names
its protocol stage in the :data:`~anomalyclaw.graph.vlm.seam.STAGE_HEADER` header. Both clients
read replies through :class:`_BoundedReplies` (on aiohttp by default, ``EndpointConfig.transport``),
so both refuse the same replies.
With ``tools`` (native tool calling) both clients send the function schemas and read the
reply's tool calls; an endpoint that answers such a request with a 4xx about tools raises
:class:`ToolsUnsupportedError`. Inside a LangGraph run, each retry is a ``stream_mode="custom"``
event (``vlm_retry``).

- :class:`ChatVLM`: any LangChain chat model through ``ainvoke``; the ``openai`` backend's default
  client is ``ChatOpenAI`` (langchain-openai) against an OpenAI-compatible endpoint.
- :class:`OpenAIVLM` (``EndpointConfig.client = "sdk"``): the LangChain messages the graphs build
  are turned into the OpenAI wire format once (``convert_to_openai_messages``), serialised once,
  and posted with the ``openai`` SDK's async client, which skips LangChain's per-request content
  conversion; ``anomalyclaw bench`` measures what that saves.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
from abc import ABC, abstractmethod
import json
import logging
import math
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import aiohttp
import httpx2
import openai
import orjson
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from anomalyclaw.config import EndpointConfig, redact
from anomalyclaw.errors import EndpointFatalError, EndpointUnreachableError
from anomalyclaw.events import emit
from anomalyclaw.priority import PrioritySlots
from anomalyclaw.threads import to_compute_thread

from .replicas import Replica, ReplicaSet, public_url
from .seam import (STAGE_HEADER, BadResponseError, ToolsUnsupportedError, VLMError, VLMReply, count_images,
                   read_tool_call, request_size, tools_size)


log = logging.getLogger(__name__)

_TRANSIENT = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
              openai.APITimeoutError, openai.ConflictError, BadResponseError)
#: What a reply that is not a chat completion raises inside the clients' parsers.
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


def _replica_fault(exc: BaseException) -> bool:
    """A failure that counts against the replica itself: refused or dropped connection,
    timeout, total deadline, 5xx (not a 429: a busy replica is alive)."""
    if isinstance(exc, (openai.APIConnectionError, RequestDeadlineError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status >= 500


def _dropped_connection(exc: BaseException) -> BaseException | None:
    """The aiohttp error under a timeout ``exc`` when it is a reset, dropped or closed connection
    instead: the SDK's aiohttp bridge raises httpx's ``ConnectTimeout`` for every aiohttp
    connection error (so the SDK says "Request timed out."), where httpx says "Connection error"."""
    if not isinstance(exc, openai.APITimeoutError):
        return None
    cause, depth = exc.__cause__, 0
    while cause is not None and depth < 8:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, asyncio.TimeoutError):
            return cause
        cause, depth = cause.__cause__, depth + 1
    return None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (*_TRANSIENT, RequestDeadlineError)):
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
        value = float(raw) if raw else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return value if value is not None and math.isfinite(value) and value >= 0 else None


class RequestDeadlineError(VLMError):
    """A request that did not complete (connect, send, whole reply) within its deadline."""


class _BoundedReplies:
    """What the HTTP client of both endpoint clients adds to its base (one of the openai SDK's
    async clients): it reads each reply itself, decoded, and refuses (:class:`BadResponseError`,
    retried like a 5xx) one whose body is above ``max_reply_bytes`` (declared or read), whose
    compressed body is corrupt, or that is an event stream where a JSON completion was asked.
    Streaming requests are passed through as they are."""

    def __init__(self, *, max_reply_bytes: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_reply_bytes = max_reply_bytes

    async def send(self, request: httpx2.Request, *, stream: bool = False, **kwargs: Any) -> httpx2.Response:
        response = await super().send(request, stream=True, **kwargs)
        if stream:
            return response
        limit = self.max_reply_bytes
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadResponseError(f"the reply is {int(declared):,} bytes, above the {limit:,}-byte bound "
                                       "(ANOMALYCLAW_MAX_REPLY_BYTES)")
            if "text/event-stream" in response.headers.get("content-type", "") and response.status_code < 300:
                raise BadResponseError("the endpoint answered with an event stream (SSE) where a JSON completion "
                                       "was asked; check the server's streaming setting")
            parts, size = [], 0
            async for part in response.aiter_bytes():
                size += len(part)
                if size > limit:
                    raise BadResponseError(f"the reply is above the {limit:,}-byte bound (ANOMALYCLAW_MAX_REPLY_BYTES)")
                parts.append(part)
        except httpx2.DecodingError as exc:
            raise BadResponseError(f"the reply's compressed body is corrupt ({exc})") from None
        finally:
            await response.aclose()
        response._content = b"".join(parts)  # what Response.aread() returns from now on
        return response


class BoundedAsyncClient(_BoundedReplies, openai.DefaultAioHttpClient):
    """:class:`_BoundedReplies` on aiohttp (``EndpointConfig.transport = "aiohttp"``, the default):
    the SDK's ``DefaultAioHttpClient``, whose pool keeps no per-request scan of its idle sockets
    (httpcore checks every idle connection for a server's close on each request and each reply,
    a ``getpeername`` and a ``poll`` apiece, so its cost grows with the concurrency)."""


class BoundedHttpxClient(_BoundedReplies, openai.DefaultAsyncHttpxClient):
    """:class:`_BoundedReplies` on httpx's own transport (``transport = "httpx"``)."""


def _count(value: Any) -> int | None:
    """A token count as an int: some servers send ``"12"`` or ``12.0``; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _refuses_tools(exc: BaseException) -> bool:
    """A 4xx that blames the request's tools (vLLM: '"auto" tool choice requires
    --enable-auto-tool-choice ...'; Ollama: '... does not support tools')."""
    status = getattr(exc, "status_code", None)
    return status in (400, 422, 501) and "tool" in str(exc).lower()


@dataclass
class _Answer:
    """What one successful request returned."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    top_logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    message_id: str | None = None
    request_bytes: int | None = None
    """The body's length when the client learnt it only while sending (``_prepare`` gave 0)."""

    def __post_init__(self) -> None:
        self.prompt_tokens = _count(self.prompt_tokens)
        self.completion_tokens = _count(self.completion_tokens)
        if not (isinstance(self.top_logprobs, list) and all(isinstance(t, dict) for t in self.top_logprobs)):
            self.top_logprobs = None


@dataclass
class _EndpointVLM(ABC):
    """Retries, the concurrency bound and the measurements shared by the real clients.

    ``max_concurrency`` is THE bound on requests in flight for everything that shares this
    object (a whole run shares one); waiting for a retry does not hold a slot, and waiting
    requests get a slot oldest item first (:mod:`anomalyclaw.priority`). With several
    ``base_urls`` (replicas of one endpoint) each attempt goes to the replica with the fewest
    requests in flight, a failing replica rests, and the run stops only when every replica is
    down (:mod:`~anomalyclaw.graph.vlm.replicas`).
    """

    model: str = "unknown"
    backend: str = "openai"
    max_retries: int = 5
    backoff_max_s: float = 30.0
    max_concurrency: int = 8
    timeout_s: float = 120.0
    """The total deadline of one request (connect, send, the whole reply), retried after it."""
    secrets: list[str] = field(default_factory=list, repr=False)
    base_urls: tuple[str, ...] = ()
    """Replicas of the endpoint (empty: the one the client was built for)."""
    rest_after: int = 3
    down_after_s: float = 60.0
    _bound: tuple[Any, PrioritySlots, dict[int, Any], Any] | None = field(default=None, init=False, repr=False)
    _replica_set: ReplicaSet | None = field(default=None, init=False, repr=False)

    @property
    def replicas(self) -> ReplicaSet:
        """The replicas and their counters (one for a client without URLs)."""
        if self._replica_set is None:
            self._replica_set = ReplicaSet(list(self.base_urls) or ["(client)"], rest_after=self.rest_after,
                                           rest_max_s=max(1.0, self.backoff_max_s), down_after_s=self.down_after_s)
        return self._replica_set

    def replica_stats(self) -> list[dict[str, Any]]:
        """Requests, errors and latency per replica (see :meth:`ReplicaSet.stats`)."""
        return self.replicas.stats()

    def _loop_state(self) -> tuple[PrioritySlots, dict[int, Any]]:
        """This event loop's semaphore and clients (one per replica, made on first use). Both
        belong to one loop (a pooled connection cannot be reused from another), so a new loop
        gets new ones: the same VLM serves one ``asyncio.run`` after another (a notebook,
        ``run_items`` twice)."""
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            clients: dict[int, Any] = {}
            self._bound = (loop, PrioritySlots(max(1, self.max_concurrency)), clients, self._closer(clients))
            try:  # run it to its yield: the loop now holds it, and finalises it when it shuts down
                self._bound[3].__anext__().send(None)
            except StopIteration:
                pass
        return self._bound[1], self._bound[2]

    async def _closer(self, clients: dict[int, Any]) -> Any:
        """Closes this loop's clients when the loop shuts down (``asyncio.run`` finalises the
        async generators it started) if nobody called :meth:`aclose`: aiohttp's sessions warn
        when collected open, and their sockets would wait for the collector."""
        try:
            yield
        finally:
            for client in list(clients.values()):
                try:
                    await self._disconnect(client)
                except Exception:  # a connection the server dropped: nothing is left to close
                    pass
            clients.clear()

    def _client(self, clients: dict[int, Any], replica: Replica) -> Any:
        if replica.index not in clients:
            clients[replica.index] = self._connect(self.base_urls[replica.index] if self.base_urls else None)
        return clients[replica.index]

    @abstractmethod
    def _connect(self, base_url: str | None = None) -> Any:
        """A client for the running event loop (for the replica at ``base_url``)."""

    async def _disconnect(self, client: Any) -> None:
        """Close ``client``'s connections, when this object owns them."""

    async def aclose(self) -> None:
        """Close the running loop's connections (a later call in any loop opens new ones)."""
        if self._bound is not None and self._bound[0] is asyncio.get_running_loop():
            closer, self._bound = self._bound[3], None
            await closer.aclose()

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc)
        backoff = wait_random_exponential(multiplier=0.5, max=self.backoff_max_s)(state)
        return min(self.backoff_max_s, hinted) if hinted is not None else backoff

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info("%s request failed (attempt %d of %d: %s); retrying in %.2f s", self.model, state.attempt_number,
                 self.max_retries + 1, self._what(exc) if exc else "?", state.upcoming_sleep)

    #: Whether :meth:`_prepare` is heavy enough (the whole body serialised) to run in a thread.
    _prepare_off_loop: bool = field(default=False, init=False, repr=False)

    @abstractmethod
    def _prepare(self, messages: Sequence[BaseMessage], logprobs: bool,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[Any, int, int]:
        """(request, request bytes, images) for ``messages`` (and ``tools``, the function schemas
        of native tool calling); built once, sent on every attempt."""

    @abstractmethod
    async def _send(self, client: Any, request: Any, logprobs: bool, stage: str) -> _Answer:
        """Post ``request`` once with ``client`` and read the reply; the request names ``stage``
        in the :data:`STAGE_HEADER` header."""

    async def acall(self, messages: Sequence[BaseMessage], *, stage: str, view: Any = None,
                    logprobs: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> VLMReply:
        """One request for ``stage``, retried as the class docstring says (``view`` is ignored:
        a real model sees only the messages)."""
        if self._prepare_off_loop:  # conversion and JSON of a request with images: keep them off the loop
            request, nbytes, nimages = await to_compute_thread(self._prepare, messages, logprobs, tools or None)
        else:
            request, nbytes, nimages = self._prepare(messages, logprobs, tools or None)
        attempts = 0
        start = time.perf_counter()
        log.debug("%s request: stage %s, %d bytes, %d image(s)", self.model, stage, nbytes, nimages)

        def retrying(state: RetryCallState) -> None:
            self._log_retry(state)
            exc = state.outcome.exception() if state.outcome else None
            emit("vlm_retry", stage=stage, attempt=state.attempt_number,
                 reason=self._describe(exc)[:200] if exc else "", wait_s=round(state.upcoming_sleep, 3))

        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_is_transient), wait=self._wait, before_sleep=retrying,
                    stop=stop_after_attempt(self.max_retries + 1), reraise=True):
                with attempt:
                    attempts += 1
                    slots, clients = self._loop_state()
                    async with slots:
                        answer = await self._attempt(clients, request, logprobs, stage)
                    if answer.request_bytes:
                        nbytes = answer.request_bytes
        except _FATAL as exc:
            raise EndpointFatalError(self._describe(exc, fatal=True)) from None
        except (openai.OpenAIError, VLMError, asyncio.TimeoutError) as exc:
            if tools and _refuses_tools(exc):
                detail = redact(str(getattr(exc, "message", None) or exc), self.secrets)[:300]
                raise ToolsUnsupportedError(
                    f"the endpoint refused a request with tools (HTTP {getattr(exc, 'status_code', '?')}: {detail}); "
                    "native tool calling needs a server with a tool parser (vLLM: --enable-auto-tool-choice "
                    "--tool-call-parser NAME), else use --tool-calling json or auto") from None
            raise VLMError(self._describe(exc, attempts=attempts)) from None
        log.info("%s reply: stage %s in %.2f s after %d attempt(s), %s completion tokens", self.model, stage,
                  time.perf_counter() - start, attempts, answer.completion_tokens)
        return VLMReply(text=answer.text, stage=stage, latency_s=time.perf_counter() - start,
                        prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                        request_bytes=nbytes * attempts, images_sent=nimages * attempts,
                        retries=attempts - 1, top_logprobs=answer.top_logprobs,
                        tool_calls=(answer.tool_calls or []) if tools else None, message_id=answer.message_id)

    async def _attempt(self, clients: dict[int, Any], request: Any, logprobs: bool, stage: str) -> _Answer:
        """One attempt on the replica with the fewest requests in flight, counted on it."""
        replicas = self.replicas
        replica = replicas.choose()  # raises EndpointsDownError when every replica is down
        started = time.perf_counter()
        try:
            answer = await self._send_within_deadline(self._client(clients, replica), request, logprobs, stage)
        except (asyncio.CancelledError, KeyboardInterrupt):
            replicas.done(replica)
            raise
        except BaseException as exc:
            what = failure = self._what(exc)
            fault = isinstance(exc, Exception) and _replica_fault(exc)
            if len(replicas) > 1:
                failure += f" at {public_url(replica.url)}"
                try:
                    exc.add_note(f"replica {public_url(replica.url)}")  # _describe names it
                except AttributeError:
                    pass
                if fault:
                    log.info("replica %s failed (%s)", public_url(replica.url), what)
            replicas.done(replica, failure=failure, replica_fault=fault)
            raise
        replicas.done(replica, latency_s=time.perf_counter() - started)
        return answer

    async def _send_within_deadline(self, client: Any, request: Any, logprobs: bool, stage: str) -> _Answer:
        """:meth:`_send` under the total deadline: the clients' own timeouts bound each read, not
        the request, so a reply dripped a few bytes at a time would hold a slot for minutes."""
        try:
            return await asyncio.wait_for(self._send(client, request, logprobs, stage), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestDeadlineError(f"no complete reply within the {self.timeout_s:g} s deadline "
                                       "(--timeout / ANOMALYCLAW_TIMEOUT_S)") from None

    @staticmethod
    def _what(exc: BaseException) -> str:
        status = getattr(exc, "status_code", None)
        if status:
            return f"HTTP {status}"
        if _dropped_connection(exc) is not None:
            return "connection failed"
        if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, RequestDeadlineError)):
            return "request timed out"
        if isinstance(exc, openai.APIConnectionError):
            return "connection failed"
        if isinstance(exc, BadResponseError):
            return "unreadable reply"
        return type(exc).__name__

    def _describe(self, exc: BaseException, *, fatal: bool = False, attempts: int = 1) -> str:
        status = getattr(exc, "status_code", None)
        what = self._what(exc)
        where = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str) and n.startswith("replica ")]
        if where:
            what += " at " + where[-1].removeprefix("replica ")
        dropped = _dropped_connection(exc)
        detail = redact((str(dropped) or type(dropped).__name__) if dropped else str(exc), self.secrets)[:300]
        if fatal:
            hint = {401: "the API key is wrong or missing (ANOMALYCLAW_API_KEY)",
                    403: "the API key may not use this model",
                    404: f"the endpoint does not serve model {self.model!r} or the base URL is wrong"}.get(
                        status or 0, "the endpoint refuses requests")
            return f"VLM endpoint refused the request ({what}): {hint}. Detail: {detail}"
        return f"VLM request failed after {attempts} attempt(s) ({what}): {detail}"


@dataclass
class OpenAIVLM(_EndpointVLM):
    """The ``openai`` backend: OpenAI-compatible ``/chat/completions`` through the openai SDK.

    The request body is serialised once per call (its length is the ``request_bytes`` a call
    reports) and resent as is on a retry.
    """

    endpoint: EndpointConfig | None = field(default=None, repr=False)
    """Base URL, key and timeout of the ``openai.AsyncOpenAI`` clients (one per event loop), and
    the sampling settings of every request."""

    def _connect(self, base_url: str | None = None) -> openai.AsyncOpenAI:
        return make_openai_client(self.endpoint.for_url(base_url) if base_url else self.endpoint)

    async def _disconnect(self, client: openai.AsyncOpenAI) -> None:
        await client.close()

    def __post_init__(self) -> None:
        self._prepare_off_loop = True

    def _prepare(self, messages: Sequence[BaseMessage], logprobs: bool,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[tuple[bytes, bool], int, int]:
        payload = convert_to_openai_messages(list(messages))
        body: dict[str, Any] = {"model": self.model, "messages": payload, "temperature": self.endpoint.temperature,
                                "max_tokens": self.endpoint.max_tokens}
        if logprobs:
            body.update(logprobs=True, top_logprobs=5)
        if tools:
            body["tools"] = list(tools)
        data = dump_body(body)
        return (data, bool(tools)), len(data), count_images(payload)

    async def _send(self, client: openai.AsyncOpenAI, request: tuple[bytes, bool], logprobs: bool,
                    stage: str) -> _Answer:
        data, tools = request
        raw = await client.post("/chat/completions", content=data, cast_to=bytes,
                                options={"headers": {"Content-Type": "application/json", STAGE_HEADER: stage}})
        return _read_completion(raw, logprobs, tools)


#: Content-part types that carry the model's reasoning, never its answer.
_REASONING_PARTS = frozenset({"reasoning", "thinking", "reasoning_content", "redacted_thinking"})


def _text_of(content: Any) -> str:
    """A reply's text, whether the server gave one string or a list of content parts (reasoning
    parts left out)."""
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else p.get("text", "") if isinstance(p.get("text"), str) else ""
                       for p in content
                       if isinstance(p, str) or (isinstance(p, dict) and p.get("type") not in _REASONING_PARTS))
    return content if isinstance(content, str) else ""


def _tool_call_text(calls: Any) -> str:
    """The first tool call's arguments, for a reply that answers with a tool call instead of
    text (the parser then reads them as the stage's JSON, or the repair prompt says what is
    missing)."""
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
        return ""
    call = calls[0]
    args = (call.get("function") or {}).get("arguments") if isinstance(call.get("function"), dict) else call.get("args")
    if isinstance(args, dict):
        return json.dumps(args)
    return args if isinstance(args, str) else ""


def _read_completion(raw: bytes, logprobs: bool, tools: bool = False) -> _Answer:
    """The text, token counts, first-token top log-probs and tool calls of a chat-completion
    body (``tools``: the request offered tools, so a tool call is an action, never the reply's
    text); a body of another shape raises :class:`BadResponseError`."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and body.get("error") and not body.get("choices"):
            error = body["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise BadResponseError(f"the endpoint answered 200 with an error: {str(message)[:200]}")
        choice = body["choices"][0]
        message = choice["message"]
        text = _text_of(message.get("content")) or ("" if tools else _tool_call_text(message.get("tool_calls")))
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        top = None
        if logprobs and isinstance(choice.get("logprobs"), dict):
            tokens = choice["logprobs"].get("content")
            if tokens and isinstance(tokens[0], dict):
                top = tokens[0].get("top_logprobs")
        calls = [read_tool_call(c.get("id"), (c.get("function") or {}).get("name"),
                                (c.get("function") or {}).get("arguments"))
                 for c in choice["message"].get("tool_calls") or ()]
    except _MALFORMED:
        preview = raw[:120].decode("utf-8", "replace").replace("\n", " ")
        raise BadResponseError(f"the reply is not a chat completion: {preview!r}") from None
    return _Answer(text=text, prompt_tokens=usage.get("prompt_tokens"),
                   completion_tokens=usage.get("completion_tokens"), top_logprobs=top, tool_calls=calls,
                   message_id=body.get("id") if isinstance(body.get("id"), str) else None)


@dataclass
class ChatVLM(_EndpointVLM):
    """Any LangChain chat model behind the :class:`VLM` seam (through ``ainvoke``).

    With ``endpoint`` set (the ``openai`` backend), each event loop gets its own ``ChatOpenAI``
    and connection pool from :func:`make_chat_model` (``chat_model`` is the first); without it,
    ``chat_model`` (the caller's, with the caller's client) serves every loop.
    """

    chat_model: BaseChatModel | None = field(default=None, repr=False)
    endpoint: EndpointConfig | None = field(default=None, repr=False)
    _handed_out: bool = field(default=False, init=False, repr=False)

    def _connect(self, base_url: str | None = None) -> BaseChatModel:
        if self.endpoint is None:
            return self.chat_model
        first = not self.base_urls or base_url == self.base_urls[0]
        if not first:  # another replica: its own ChatOpenAI
            return make_chat_model(self.endpoint.for_url(base_url))
        if self.chat_model is None or self._handed_out:
            self.chat_model = make_chat_model(self.endpoint.for_url(base_url) if base_url else self.endpoint)
        self._handed_out = True  # the first loop uses the one built up front, later ones new ones
        return self.chat_model

    async def _disconnect(self, client: BaseChatModel) -> None:
        if self.endpoint is not None:
            await client.http_async_client.aclose()

    def _prepare(self, messages: Sequence[BaseMessage], logprobs: bool,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 ) -> tuple[tuple[list[BaseMessage], list[dict[str, Any]] | None], int, int]:
        tool_list = [dict(t) for t in tools] if tools else None
        if self.endpoint is not None:
            # The ChatOpenAI we built serialises the body itself (see PreparedCompletions) and
            # reports its length; counting images needs no conversion.
            return (list(messages), tool_list), 0, _count_message_images(messages)
        nbytes, nimages = request_size(messages)
        return (list(messages), tool_list), nbytes + tools_size(tools), nimages

    async def _send(self, client: BaseChatModel, request: tuple[list[BaseMessage], list[dict[str, Any]] | None],
                    logprobs: bool, stage: str) -> _Answer:
        request, tools = request
        model: Any = client.bind_tools(tools) if tools else client
        model = model.bind(logprobs=True, top_logprobs=5) if logprobs else model
        # Only the ChatOpenAI this object built is known to pass extra headers through; a
        # caller's own chat model gets the messages alone.
        headers = {"extra_headers": {STAGE_HEADER: stage}} if self.endpoint is not None else {}
        sizes: list[int] = []
        token = _BODY_SIZES.set(sizes)
        try:
            message = await model.ainvoke(request, **headers)
            usage = getattr(message, "usage_metadata", None) or {}
            meta = getattr(message, "response_metadata", None) or {}
            top = None
            content = (meta.get("logprobs") or {}).get("content") if isinstance(meta.get("logprobs"), dict) else None
            if content and isinstance(content[0], dict):
                top = content[0].get("top_logprobs")
            calls = [read_tool_call(c.get("id"), c.get("name"), c.get("args"))
                     for c in getattr(message, "tool_calls", None) or ()]
            calls += [read_tool_call(c.get("id"), c.get("name"), c.get("args"))
                      for c in getattr(message, "invalid_tool_calls", None) or ()]
            # Offered no tools, a model that answers with a tool call meant it as its reply.
            text = _text_of(message.content) or ("" if tools else _tool_call_text(getattr(message, "tool_calls", None)))
        except _MALFORMED as exc:  # a 200 whose body is not a completion (choices: [] is an IndexError)
            raise BadResponseError(f"the reply is not a chat completion: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}") from None
        finally:
            _BODY_SIZES.reset(token)
        return _Answer(text=text, prompt_tokens=usage.get("input_tokens"),
                       completion_tokens=usage.get("output_tokens"), top_logprobs=top, tool_calls=calls,
                       message_id=getattr(message, "id", None), request_bytes=sizes[-1] if sizes else None)


def make_chat_model(endpoint: EndpointConfig) -> BaseChatModel:
    """``ChatOpenAI`` for an OpenAI-compatible endpoint (vLLM, a hosted API, Ollama ...), for
    use as a LangChain chat model (``make_vlm(chat_model=...)`` wraps it in :class:`ChatVLM`).

    Retries are ours, so the client's own are off. It gets a connection pool of its own
    (langchain-openai's default pool is shared by every ``ChatOpenAI`` with the same URL, across
    event loops, and a pooled connection from a closed loop fails the next request).
    """
    from langchain_openai import ChatOpenAI

    endpoint.require()
    _cache_langchain_block_types()
    model = ChatOpenAI(base_url=endpoint.base_urls[0], model=endpoint.model,
                       api_key=endpoint.api_key or "EMPTY", timeout=endpoint.timeout_s, max_retries=0,
                       http_async_client=_http_client(endpoint),
                       temperature=endpoint.temperature, max_tokens=endpoint.max_tokens,
                       # Token counts also when LangGraph streams the reply (``stream_mode="messages"``,
                       # ``astream_events``): langchain-openai asks for them only from api.openai.com.
                       stream_usage=True)
    model.async_client = PreparedCompletions(model.root_async_client)
    return model


#: The body lengths :class:`PreparedCompletions` posted in this context (ChatVLM reads them).
_BODY_SIZES: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("anomalyclaw_body_sizes",
                                                                               default=None)
class PreparedCompletions:
    """``ChatOpenAI.async_client`` for OpenAI-compatible chat completions: the payload ChatOpenAI
    built is serialised once (:func:`dump_body`) and posted with the SDK's
    own client, its auth and errors; the reply is handed back as its JSON object (a dict), which
    ChatOpenAI reads as it reads a typed ``ChatCompletion``. Streamed requests go through the
    SDK's own ``create`` unchanged.

    ``openai``'s ``chat.completions.create`` first walks every content part of every message
    against the request's typed schema (its ``transform``); for a request with a few images that
    walk costs more CPU than the HTTP exchange itself, and it changes nothing in a chat-completion
    body (it renames no keys and formats no values there). ``anomalyclaw bench`` measures the
    CPU per item.
    """

    def __init__(self, client: openai.AsyncOpenAI, *, raw: bool = False):
        self._client = client
        self._raw = raw

    @property
    def with_raw_response(self) -> "PreparedCompletions":
        return PreparedCompletions(self._client, raw=True)

    async def create(self, *, extra_headers: dict[str, str] | None = None, extra_query: dict[str, Any] | None = None,
                     extra_body: dict[str, Any] | None = None, timeout: Any = None, **body: Any) -> Any:
        from openai._constants import RAW_RESPONSE_HEADER

        if body.get("stream"):
            sdk = self._client.chat.completions
            return await (sdk.with_raw_response if self._raw else sdk).create(
                extra_headers=extra_headers, extra_query=extra_query, extra_body=extra_body,
                **({"timeout": timeout} if timeout is not None else {}), **body)
        if extra_body:
            body.update(extra_body)
        data = dump_body(body)  # tens of microseconds even with images: no thread hop
        sizes = _BODY_SIZES.get()
        if sizes is not None:
            sizes.append(len(data))
        headers = {"Content-Type": "application/json", **(extra_headers or {})}
        if self._raw:
            headers[RAW_RESPONSE_HEADER] = "true"
        options: dict[str, Any] = {"headers": headers}
        if extra_query:
            options["params"] = extra_query
        if timeout is not None:
            options["timeout"] = timeout
        # The reply's JSON as a dict, which ChatOpenAI reads as it reads a ChatCompletion's dump:
        # building the typed model field by field cost ~80 us of the event loop per request.
        return await self._client.post("/chat/completions", content=data, cast_to=object, options=options)


def dump_body(body: dict[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON, with orjson: the JSON ``json.dumps`` writes, at a
    small fraction of its CPU on bodies with image data URLs (``json.dumps`` took 2-2.6 ms per
    item of a run, README "Performance"), so it runs on the event loop. A non-finite number is
    refused, naming where it is: orjson alone would write ``null``."""
    _require_finite(body, "body")
    return orjson.dumps(body)


def _require_finite(value: Any, where: str) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"request {where} is {value!r}: JSON has no non-finite numbers")
    elif isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(v, str):
                _require_finite(v, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if not isinstance(v, str):
                _require_finite(v, f"{where}[{i}]")


def _count_message_images(messages: Sequence[BaseMessage]) -> int:
    """Image parts in LangChain messages (what ``count_images`` counts after conversion)."""
    return sum(1 for m in messages if isinstance(m.content, list)
               for part in m.content if isinstance(part, dict) and part.get("type") in ("image_url", "image"))


@functools.cache
def _cache_langchain_block_types() -> None:
    """langchain-core's ``is_data_content_block`` (run by ChatOpenAI on every content part of
    every message) recomputes ``typing.get_type_hints`` of five TypedDicts each time it is
    called, about a millisecond per request with a few images; the answer is a constant of the
    installed version, so remember it. Left alone when langchain-core lacks the function."""
    try:
        from langchain_core.messages import content as lc_content
    except ImportError:
        return
    fn = getattr(lc_content, "_get_data_content_block_types", None)
    if callable(fn) and not hasattr(fn, "cache_info"):
        lc_content._get_data_content_block_types = functools.cache(fn)


def _http_client(endpoint: EndpointConfig) -> _BoundedReplies:
    kind = BoundedAsyncClient if endpoint.transport == "aiohttp" else BoundedHttpxClient
    return kind(timeout=endpoint.timeout_s, max_reply_bytes=endpoint.max_reply_bytes, verify=_tls_context())


def _tls_context() -> ssl.SSLContext:
    """The TLS context of every HTTP client this process makes: the one httpx would make for
    each (the system's CA store, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set), made once.
    Reading the CA store is ~19 ms of CPU, which each client (one per replica per event loop,
    per worker, per run) paid again, even for a plain ``http://`` endpoint."""
    return _tls_context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _tls_context_for(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    # Keyed by the two variables httpx reads, so that setting one later takes effect.
    return httpx2.create_ssl_context(verify=True, trust_env=True)


def make_openai_client(endpoint: EndpointConfig) -> openai.AsyncOpenAI:
    """The SDK's async client for ``endpoint`` (retries off: :class:`OpenAIVLM` does its own)."""
    endpoint.require()
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else "EMPTY"
    return openai.AsyncOpenAI(base_url=endpoint.base_urls[0], api_key=key, timeout=endpoint.timeout_s, max_retries=0,
                              http_client=_http_client(endpoint))


def check_endpoint(endpoint: EndpointConfig, *, timeout_s: float = 15.0) -> list[str]:
    """:func:`check_replica` for each replica of ``endpoint``: a key or model refused by any
    stops the run; replicas that do not answer are logged and left to the run's rest-and-retry,
    unless none answers (:class:`EndpointUnreachableError` naming each)."""
    endpoint.require()
    urls = endpoint.base_urls
    if len(urls) <= 1:
        return check_replica(endpoint, timeout_s=timeout_s)
    names: list[str] | None = None
    down: list[str] = []
    for url in urls:
        try:
            listed = check_replica(endpoint.for_url(url), timeout_s=timeout_s)
        except EndpointUnreachableError as exc:
            down.append(str(exc))
            continue
        names = listed if names is None else names
    if names is None:
        raise EndpointUnreachableError(f"none of the {len(urls)} VLM endpoint replicas answers: " + "; ".join(down))
    for why in down:
        log.warning("%s; the run starts with the other replicas and retries this one later", why)
    return names


def check_replica(endpoint: EndpointConfig, *, timeout_s: float = 15.0) -> list[str]:
    """One cheap request before a run's first item, so that a wrong URL or key stops the run at
    once instead of costing every item its retries: ``GET {base_url}/models``, or, where the
    server has no such route, a 1-token completion. Returns the model names the endpoint lists
    (empty when it lists none).

    Raises :class:`EndpointUnreachableError` naming the URL when nothing answers (connection
    refused, unknown host, no reply within ``timeout_s``) and :class:`EndpointFatalError` when
    the endpoint refuses the key (401, 403) or, on the completion, the model (404). A model
    missing from the list is only logged: gateways list names their routes accept in other
    spellings.
    """
    endpoint.require()
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else "EMPTY"
    secrets = endpoint.secret_values()
    url = endpoint.base_urls[0]
    client = openai.OpenAI(base_url=url, api_key=key, timeout=min(timeout_s, endpoint.timeout_s), max_retries=0)

    def unreachable(exc: BaseException) -> EndpointUnreachableError:
        if isinstance(exc, openai.APITimeoutError):
            why = f"no answer within {min(timeout_s, endpoint.timeout_s):g} s"
        else:
            cause = exc.__cause__ or exc.__context__
            why = redact(str(cause or exc), secrets)[:200] or type(exc).__name__
        return EndpointUnreachableError(
            f"the VLM endpoint {url} does not answer ({why}); check --base-url / ANOMALYCLAW_BASE_URL and that "
            "the server is running")

    def refused(exc: openai.APIStatusError, what: str) -> EndpointFatalError:
        hint = {401: f"the API key is wrong or missing ({endpoint.variables()[1]})",
                403: "the API key may not use this endpoint",
                404: f"the endpoint does not serve model {endpoint.model!r} or the base URL is wrong"}.get(
                    exc.status_code, "the endpoint refuses requests")
        return EndpointFatalError(f"the VLM endpoint {url} refused {what} (HTTP {exc.status_code}): {hint}. "
                                  f"Detail: {redact(str(exc), secrets)[:300]}")

    try:
        with client:
            try:
                names = [m.id for m in client.models.list().data]
                log.info("endpoint %s answers and lists %d model(s)", url, len(names))
                if names and endpoint.model not in names:
                    log.warning("the endpoint %s does not list model %r (it lists %s); the first request will "
                                "tell whether it serves it", url, endpoint.model, ", ".join(sorted(names)[:10]))
                return names
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise refused(exc, "the models list") from None
            except openai.APIStatusError as exc:  # no /models route: ask for one token instead
                log.info("endpoint %s: GET /models answered HTTP %d; trying a 1-token completion", url,
                         exc.status_code)
            try:
                client.chat.completions.create(model=endpoint.model, max_tokens=1,
                                               messages=[{"role": "user", "content": "Reply with one word: ok"}])
                log.info("endpoint %s answers a 1-token completion", url)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                raise refused(exc, "a 1-token completion") from None
            except openai.APIStatusError as exc:  # a 5xx or 429: the run's retries deal with that
                log.warning("endpoint %s answered a 1-token completion with HTTP %d; starting anyway", url,
                            exc.status_code)
            return []
    except openai.APIConnectionError as exc:  # refused, unknown host, timed out
        raise unreachable(exc) from None
