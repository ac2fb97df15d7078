"""A local OpenAI-compatible chat endpoint with scripted replies, latency and faults.

Tests and benchmarks drive the real ``openai`` backend against it on 127.0.0.1: scripted
replies, a fixed latency per request, and injected faults (500, 429 with and without
Retry-After, timeouts, connection resets, a gateway's HTML page with status 200, empty or cut or
prose replies, unknown tool names, scores out of range or NaN, 401, 404). Without a script it
answers each stage of the AnomalyClaw protocol with a well-formed reply, so a whole run can go
through it.

Like a real server it streams when asked (``"stream": true``: server-sent events, one
``data: {chat.completion.chunk}`` per piece, the usage chunk when ``stream_options.include_usage``
is set, then ``data: [DONE]``), and it speaks native tool calling: a request that carries
``tools`` gets the reply's JSON action as ``tool_calls`` (:func:`~anomalyclaw.graph.replies.native_reply`),
or, with ``tools_supported=False``, the 400 a vLLM started without ``--enable-auto-tool-choice``
answers.

Each request's stage comes from the ``X-AnomalyClaw-Stage`` header the project's clients send
(:data:`~anomalyclaw.graph.vlm.seam.STAGE_HEADER`); a request without it (another client) is
matched by the reply format its last user message asks for.

Run it by hand (the benchmarks start it as a process this way):
``python -m anomalyclaw.graph.vlm.fake_server --port 8011 --latency 0.1``; it prints its base URL
as the first line of standard output (``--port 0`` picks a free port).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from ..replies import (COMMIT, FORMATS, commit_reply, direct_reply, mcq_commit_reply, mcq_propose_reply,
                       mcq_refute_reply, native_reply, propose_reply, refute_reply, tool_action)
from .seam import STAGE_HEADER, STAGES

#: Fault kinds the server can inject, by name.
FAULTS = ("500", "429", "429_retry_after", "timeout", "reset", "html", "empty", "cut", "prose",
          "bad_tool", "bad_score", "nan_score")
#: Faults that can never succeed; not part of the random mix.
FATAL = ("401", "404")
#: The adversarial kinds (scripted only, not part of the random mix): a reply dripped a few
#: bytes at a time; a 50 MB body; ``choices: []``; ``content: null``; content as a list of parts
#: (with a reasoning part); ``tool_calls`` instead of content; status 200 with ``{"error": ...}``;
#: an event stream where JSON was asked; a 307 redirect; a corrupt gzip body; a body nested
#: 100,000 deep; a ``<think>`` block with a draft before the answer; a reply that echoes the
#: prompt; token counts as strings.
HOSTILE = ("slow_drip", "huge", "no_choices", "null_content", "parts", "tool_calls", "error_200", "sse",
           "redirect", "bad_gzip", "deep", "think", "echo", "string_tokens")
#: What a vLLM without ``--enable-auto-tool-choice`` answers (HTTP 400) to a request with ``tools``.
TOOLS_UNSUPPORTED = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def _user_text(msg: dict[str, Any]) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def reply_stage(body: dict[str, Any], header: str | None = None) -> str:
    """Which protocol stage a request is for: the stage header when the client sent one, else
    the format its last user message names (``direct_logprob`` is reported as ``logprob``)."""
    if header in STAGES:
        return "logprob" if header == "direct_logprob" else header
    text = next((_user_text(m) for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    # The multiple-choice formats are quoted whole and no other prompt holds them; else the
    # formats each stage asks for, latest instruction wins.
    mcq = {stage: text.rfind(FORMATS[stage]) for stage in ("mcq_direct", "mcq_propose", "mcq_refute", "mcq_commit")}
    stage, pos = max(mcq.items(), key=lambda kv: kv[1])
    if pos >= 0:
        return stage
    marks = {"direct": text.rfind('"image_label"'), "refute": text.rfind('"verdicts"'),
             "commit": text.rfind('"anomaly_score"'), "propose": text.rfind('"initial_score"'),
             "logprob": text.rfind("one word")}
    stage, pos = max(marks.items(), key=lambda kv: kv[1])
    return stage if pos >= 0 else "direct"


def _option_letters(body: dict[str, Any]) -> list[str]:
    """The option letters the request's question lists (``"B. text"`` lines), first seen order."""
    letters: list[str] = []
    for msg in body.get("messages", []):
        if msg.get("role") != "user":
            continue
        for line in _user_text(msg).splitlines():
            line = line.strip()
            if len(line) > 2 and line[0] in "ABCDEFGH" and line[1] == "." and line[0] not in letters:
                letters.append(line[0])
    return letters or ["A"]


def default_reply(body: dict[str, Any], *, stage: str | None = None, raw: bytes | None = None) -> str:
    """A well-formed reply for the stage the request asks for (deterministic per request).

    ``raw`` is the request body as received: hashing it is cheaper than re-serialising the
    messages, and the client serialises the same messages to the same bytes.
    """
    digest = hashlib.sha256(raw if raw is not None else
                            json.dumps(body.get("messages", []), sort_keys=True).encode()).digest()
    u = digest[0] / 255.0
    stage = stage or reply_stage(body)
    if stage == "propose":
        box = [0.25, 0.25, 0.75, 0.75]
        return propose_reply(round(u, 3), [{"id": "c1", "description": "region that differs from the references",
                                            "bbox": box}],
                             tool_action("side_by_side_compare", {"bbox": box}, "c1"),
                             "check the central region against the closest reference")
    if stage == "refute":
        status = "confirmed" if u > 0.5 else "refuted"
        return refute_reply([{"id": "c1", "status": status, "evidence": "compared with references"}],
                            round(u, 3), COMMIT, "evidence gathered")
    if stage == "commit":
        return commit_reply(round(u, 3), 70, "final")
    if stage == "logprob":
        return "anomalous" if u > 0.5 else "normal"
    if stage.startswith("mcq_"):
        letters = _option_letters(body)
        letter = letters[digest[1] % len(letters)]
        if stage == "mcq_direct":
            return letter
        if stage == "mcq_propose":
            return mcq_propose_reply(letter, tool_action("side_by_side_compare", {"bbox": [0.25, 0.25, 0.75, 0.75]},
                                                         letter), "compare the central region with the references")
        if stage == "mcq_refute":
            status = "confirmed" if u > 0.5 else "uncertain"
            return mcq_refute_reply([{"id": letter, "status": status, "evidence": "compared with references"}],
                                    letter, COMMIT, "evidence gathered", {letter: round(0.5 + u / 2, 3)})
        return mcq_commit_reply(letter, "final")
    label = "anomalous" if u > 0.5 else "normal"
    return direct_reply(label, round(0.5 + abs(u - 0.5), 3), None, "overall comparison", None)


def faulty_reply(kind: str, body: dict[str, Any], *, stage: str | None = None, raw: bytes | None = None) -> str:
    """The reply text of a content fault (the HTTP exchange itself succeeds)."""
    good = default_reply(body, stage=stage, raw=raw)
    if not good.startswith("{") and kind in ("bad_tool", "bad_score", "nan_score"):
        return "Z" if kind != "bad_tool" else good  # a letter reply: a letter that is no option
    if kind == "empty":
        return ""
    if kind == "cut":
        return good[: max(1, len(good) // 2)]
    if kind == "prose":
        return "Looking at the images, I think the part seems mostly fine but I am not sure."
    if kind == "bad_tool":
        obj = json.loads(good)
        if "action" in obj:
            obj["action"] = {"tool": "tool_magic_detector", "args": {}, "candidate": "c1"}
        return json.dumps(obj)
    if kind in ("bad_score", "nan_score"):
        value = 7.5 if kind == "bad_score" else float("nan")
        obj = json.loads(good)
        for key in ("initial_score", "updated_score", "anomaly_score", "confidence"):
            if key in obj:
                obj[key] = value
        return json.dumps(obj)  # NaN is written as the bare token NaN, as some servers do
    raise ValueError(f"unknown content fault {kind!r}")


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) drops connection attempts when a client opens many at
    # once (a run at concurrency 128); a dropped SYN costs a 1 s retransmit.
    request_queue_size = 1024
    daemon_threads = True


@dataclass
class ServerStats:
    requests: int = 0
    completions: int = 0
    bytes_in: int = 0
    by_status: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    max_in_flight: int = 0
    streamed: int = 0
    """Completions sent as server-sent events (``"stream": true``)."""
    with_tools: int = 0
    """Requests that carried ``tools`` (native tool calling)."""
    tool_calls: int = 0
    """Tool calls answered."""


class FakeVLMServer:
    """An OpenAI-compatible ``/v1/chat/completions`` server on a background thread.

    ``script``: a list of replies consumed in order (a string is the reply text; ``"!500"``,
    ``"!429"``, ``"!timeout"`` ... inject that fault), a dict of such lists per protocol stage
    (``"propose"``, ``"refute"``, ``"commit"``, ``"direct"``, and ``"mcq_direct"``,
    ``"mcq_propose"``, ``"mcq_refute"``, ``"mcq_commit"`` for the multiple-choice task: the
    branches run concurrently, so
    per-stage order is the one that repeats), or a callable ``body -> str``; when a list runs
    out, :func:`default_reply` answers. A script entry may also be a dict ``{"content": str,
    "tool_calls": [{"name", "arguments"}]}`` (``arguments`` as the raw string sent, which need not
    be valid JSON): the reply exactly as given. ``fault_rate``: the probability that a
    request gets a fault drawn from ``faults`` (seeded, so runs repeat).

    ``tools_supported=False`` answers every request that carries ``tools`` with HTTP 400 and
    :data:`TOOLS_UNSUPPORTED`, as a vLLM without a tool parser does.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 api_key: str | None = None, models: Iterable[str] = ("fake-vlm",),
                 script: list[str] | dict[str, list[str]] | Callable[[dict], str] | None = None, fault_rate: float = 0.0,
                 faults: Iterable[str] = FAULTS, seed: int = 0, hang_s: float = 30.0,
                 retry_after_s: float = 0.05, record_bodies: bool = False, drip_s: float = 0.2,
                 huge_bytes: int = 50 * 2**20, tools_supported: bool = True):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake endpoint only listens on loopback")
        self.latency_s = latency_s
        self.api_key = api_key
        self.models = set(models)
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        unknown = set(self.faults) - set(FAULTS) - set(FATAL) - set(HOSTILE)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS + FATAL + HOSTILE}")
        self.hang_s = hang_s
        self.drip_s = drip_s
        """Seconds between the 8-byte pieces of a ``slow_drip`` reply."""
        self.huge_bytes = huge_bytes
        """Size of a ``huge`` reply's body."""
        self.retry_after_s = retry_after_s
        self.record_bodies = record_bodies
        self.tools_supported = tools_supported
        self.bodies: list[dict[str, Any]] = []
        self.stats = ServerStats()
        self._script: deque[str] | None = deque(script) if isinstance(script, list) else None
        self._stage_script = {k: deque(v) for k, v in script.items()} if isinstance(script, dict) else {}
        self._script_fn = script if callable(script) else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._server = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeVLMServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-vlm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeVLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ decisions
    def _next_action(self, body: dict[str, Any], stage: str, raw: bytes) -> tuple[str | None, str | dict | None]:
        """(fault kind or None, reply text (or a scripted reply dict) or None) for one completion
        request."""
        with self._lock:
            queue = self._script or self._stage_script.get(stage)
            if queue:
                entry = queue.popleft()
                if isinstance(entry, str) and entry.startswith("!"):
                    return entry[1:], None
                return None, entry
            draw = self._rng.random()
            kind = self._rng.choice(self.faults) if self.faults and draw < self.fault_rate else None
        if kind:
            return kind, None
        if self._script_fn is not None:
            return None, self._script_fn(body)
        return None, default_reply(body, stage=stage, raw=raw)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes; with Nagle on, the client's delayed ACK
            # adds ~40 ms to every reply, which would swamp the latency the server is set to.
            disable_nagle_algorithm = True

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                return

            def _stream(self, events: list[dict[str, Any]]) -> None:
                """Server-sent events in HTTP chunks, as OpenAI and vLLM stream: one ``data:``
                line per completion chunk, then ``data: [DONE]``."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for data in [json.dumps(e) for e in events] + ["[DONE]"]:
                    payload = f"data: {data}\n\n".encode()
                    self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                with server._lock:
                    server.stats.by_status[200] += 1
                    server.stats.streamed += 1

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                with server._lock:
                    server.stats.by_status[status] += 1

            def _raw(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                """``data`` as the body, with exactly ``headers`` (a fault chooses them)."""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
                    self.close_connection = True
                with server._lock:
                    server.stats.by_status[status] += 1

            def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

            def do_GET(self) -> None:  # /v1/models
                auth = self.headers.get("Authorization", "")
                if server.api_key is not None and auth != f"Bearer {server.api_key}":  # echoes it, as POST does
                    return self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.",
                                       "invalid_request_error")
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with server._lock:
                    server.stats.requests += 1
                    server.stats.bytes_in += len(raw)
                    server._in_flight += 1
                    server.stats.max_in_flight = max(server.stats.max_in_flight, server._in_flight)
                try:
                    self._complete(raw)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _complete(self, raw: bytes) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._error(404, f"no route {self.path}", "not_found")
                if server.api_key is not None:
                    auth = self.headers.get("Authorization", "")
                    if auth != f"Bearer {server.api_key}":
                        # Echo the key the client sent, as some gateways do: the client must
                        # keep it out of everything it prints or writes.
                        sent = auth.removeprefix("Bearer ")
                        return self._error(401, f"Incorrect API key provided: {sent}.", "invalid_request_error")
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    return self._error(400, "body is not JSON", "invalid_request_error")
                if body.get("model") not in server.models:
                    return self._error(404, f"The model `{body.get('model')}` does not exist.", "not_found")
                if server.record_bodies:
                    with server._lock:
                        server.bodies.append(body)
                tools = body.get("tools") or None
                if tools:
                    with server._lock:
                        server.stats.with_tools += 1
                    if not server.tools_supported:
                        return self._error(400, TOOLS_UNSUPPORTED, "BadRequestError")
                stage = reply_stage(body, self.headers.get(STAGE_HEADER))
                fault, text = server._next_action(body, stage, raw)
                with server._lock:
                    server.stats.stages[stage] += 1
                    if fault:
                        server.stats.faults[fault] += 1
                if server.latency_s:
                    time.sleep(server.latency_s)
                if fault == "500":
                    return self._error(500, "internal error (injected)", "server_error")
                if fault == "429":
                    return self._error(429, "rate limited (injected)", "rate_limit")
                if fault == "429_retry_after":
                    return self._error(429, "rate limited (injected)", "rate_limit",
                                       {"Retry-After": f"{server.retry_after_s:g}"})
                if fault == "401":
                    return self._error(401, "Incorrect API key provided.", "invalid_request_error")
                if fault == "404":
                    return self._error(404, "model not found (injected)", "not_found")
                if fault == "timeout":
                    server._stop.wait(server.hang_s)
                    self.close_connection = True
                    return None
                if fault == "html":
                    # A gateway's error page with status 200: not a chat completion at all.
                    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    with server._lock:
                        server.stats.by_status[200] += 1
                    return None
                if fault == "reset":
                    # SO_LINGER 0 makes close() send a TCP RST: a dropped connection.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return None
                if fault in HOSTILE:
                    return self._hostile(fault, body, stage, raw)
                if fault:
                    text = faulty_reply(fault, body, stage=stage, raw=raw)
                message = _message(text or "", bool(tools), stage, raw)
                with server._lock:
                    server.stats.completions += 1
                    server.stats.tool_calls += len(message.get("tool_calls") or ())
                if body.get("stream"):
                    return self._stream(_chunks(body, message, len(raw)))
                self._send(200, _completion(body, message, len(raw)))

            def _hostile(self, fault: str, body: dict[str, Any], stage: str, raw: bytes) -> None:
                good = default_reply(body, stage=stage, raw=raw)
                completion = _completion(body, _message(good, False, stage, raw), len(raw))
                message = completion["choices"][0]["message"]
                if fault == "slow_drip":
                    # A whole, valid completion, 8 bytes every drip_s: each read is quick, the
                    # reply as a whole takes minutes.
                    data = json.dumps(completion).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        for i in range(0, len(data), 8):
                            self.wfile.write(data[i:i + 8])
                            self.wfile.flush()
                            if server._stop.wait(server.drip_s):
                                break
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return None
                if fault == "huge":
                    # A completion whose rationale is huge_bytes long, sent chunked (no length
                    # announced), so only reading it tells how big it is.
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    head = json.dumps(completion).encode().split(b'"content": "', 1)
                    pieces = [head[0] + b'"content": "'] + [b"x" * 2**20] * (server.huge_bytes // 2**20) + \
                        [b'"' + head[1].split(b'"', 1)[1]]
                    try:
                        for piece in pieces:
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return None
                if fault == "no_choices":
                    completion["choices"] = []
                elif fault == "null_content":
                    message["content"] = None
                elif fault == "parts":
                    half = len(good) // 2
                    message["content"] = [{"type": "reasoning", "text": '{"draft": true} thinking...'},
                                          {"type": "text", "text": good[:half]}, {"type": "text", "text": good[half:]}]
                elif fault == "tool_calls":
                    message["content"] = None
                    message["tool_calls"] = [{"id": "call_1", "type": "function",
                                              "function": {"name": "answer", "arguments": good}}]
                    completion["choices"][0]["finish_reason"] = "tool_calls"
                elif fault == "error_200":
                    data = json.dumps({"error": {"message": "model overloaded (injected)", "type": "server_error"}})
                    return self._raw(200, data.encode(), {"Content-Type": "application/json",
                                                          "Content-Length": str(len(data))})
                elif fault == "sse":
                    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": body.get("model"),
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": good},
                                          "finish_reason": "stop"}]}
                    data = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                    return self._raw(200, data, {"Content-Type": "text/event-stream", "Content-Length": str(len(data))})
                elif fault == "redirect":
                    # To another path of this server (as a gateway that moved its API does).
                    return self._raw(307, b"", {"Location": "/v1/moved/chat/completions", "Content-Length": "0"})
                elif fault == "bad_gzip":
                    data = b"\x1f\x8b\x08\x00" + b"this is not deflate data" * 4
                    return self._raw(200, data, {"Content-Type": "application/json", "Content-Encoding": "gzip",
                                                 "Content-Length": str(len(data))})
                elif fault == "deep":
                    data = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
                    return self._raw(200, data, {"Content-Type": "application/json", "Content-Length": str(len(data))})
                elif fault == "think":
                    draft = _draft_of(good)
                    message["content"] = (f"<think>My first draft was {draft}, but {{ let me look again at the "
                                          f"edges.</think>\n{good}")
                elif fault == "echo":
                    message["content"] = _last_user_text(body)
                elif fault == "string_tokens":
                    completion["usage"] = {k: str(v) for k, v in completion["usage"].items()}
                with server._lock:
                    server.stats.completions += 1
                self._send(200, completion)

        return Handler


def _draft_of(reply: str) -> str:
    """A reasoning model's draft of ``reply``: every score mirrored, the label flipped."""
    try:
        obj = json.loads(reply)
    except ValueError:
        return reply
    for key in ("initial_score", "updated_score", "anomaly_score"):
        if isinstance(obj.get(key), (int, float)):
            obj[key] = round(1.0 - obj[key], 3)
    if obj.get("image_label") in ("normal", "anomalous"):
        obj["image_label"] = "normal" if obj["image_label"] == "anomalous" else "anomalous"
    return json.dumps(obj)


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _message(reply: str | dict[str, Any], tools: bool, stage: str, raw: bytes) -> dict[str, Any]:
    """The assistant message of a reply: a scripted dict as given, else the reply text, whose
    JSON action becomes a tool call when the request offered tools."""
    if isinstance(reply, dict):
        content, calls = reply.get("content", ""), list(reply.get("tool_calls") or ())
    elif tools:
        content, calls = native_reply(reply)
    else:
        content, calls = reply, []
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        tag = hashlib.sha256(raw).hexdigest()[:8]
        message["tool_calls"] = [{"id": c.get("id") or f"call_{stage}_{tag}_{i}", "type": "function",
                                  "function": {"name": c["name"], "arguments": c.get("arguments", "{}")}}
                                 for i, c in enumerate(calls)]
    return message


def _usage(message: dict[str, Any], prompt_chars: int) -> dict[str, int]:
    out = len(message.get("content") or "") + sum(len(json.dumps(c)) for c in message.get("tool_calls") or ())
    return {"prompt_tokens": prompt_chars // 4, "completion_tokens": max(1, out // 4),
            "total_tokens": prompt_chars // 4 + max(1, out // 4)}


def _completion(body: dict[str, Any], message: dict[str, Any], prompt_chars: int) -> dict[str, Any]:
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    if body.get("logprobs"):
        choice["logprobs"] = {"content": _logprobs(message["content"], int(body.get("top_logprobs") or 5))}
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model"), "choices": [choice], "usage": _usage(message, prompt_chars),
    }


def _pieces(text: str, n: int = 4) -> list[str]:
    """``text`` in up to ``n`` consecutive pieces (a stream sends a reply a few tokens at a time)."""
    step = max(1, -(-len(text) // n))
    return [text[i:i + step] for i in range(0, len(text), step)]


def _chunks(body: dict[str, Any], message: dict[str, Any], prompt_chars: int) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects a streaming server sends for ``message``: the role,
    the content in pieces (log-probs with the first), each tool call's name then its arguments
    in pieces, the finish reason, and the usage when ``stream_options.include_usage`` asks."""
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model")}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}

    out = [chunk({"role": "assistant", "content": ""})]
    for k, piece in enumerate(_pieces(message.get("content") or "")):
        extra = {}
        if k == 0 and body.get("logprobs"):
            extra["logprobs"] = {"content": _logprobs(message["content"], int(body.get("top_logprobs") or 5))}
        out.append(chunk({"content": piece}, **extra))
    for i, call in enumerate(message.get("tool_calls") or ()):
        fn = call["function"]
        out.append(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                          "function": {"name": fn["name"], "arguments": ""}}]}))
        for piece in _pieces(fn["arguments"], 3):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    out.append(chunk({}, "tool_calls" if message.get("tool_calls") else "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append({**head, "choices": [], "usage": _usage(message, prompt_chars)})
    return out


def _logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """Plausible token log-probs: the first word leads, its alternative trails."""
    first = text.strip().split()[0] if text.strip() else "normal"
    other = "normal" if first.startswith("anom") else "anomalous"
    top_list = [{"token": first, "logprob": -0.22, "bytes": None},
                {"token": other, "logprob": -1.6, "bytes": None}][:max(1, top)]
    return [{"token": first, "logprob": -0.22, "bytes": None, "top_logprobs": top_list}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Local OpenAI-compatible fake VLM endpoint (loopback only).")
    ap.add_argument("--port", type=int, default=8011, help="port to listen on; 0 picks a free one")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="probability that a request gets a fault")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated fault kinds from {FAULTS}")
    ap.add_argument("--hang", type=float, default=30.0, help="seconds a 'timeout' fault holds the request")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    ap.add_argument("--model", default="fake-vlm")
    ap.add_argument("--require-key-env", metavar="VAR",
                    help="answer 401 unless the client sends the key held in this environment variable")
    args = ap.parse_args(argv)
    api_key = None
    if args.require_key_env:
        api_key = os.environ.get(args.require_key_env)
        if not api_key:
            ap.error(f"--require-key-env {args.require_key_env}: that variable is not set")
    server = FakeVLMServer(port=args.port, latency_s=args.latency, fault_rate=args.fault_rate,
                           faults=[f for f in args.faults.split(",") if f], hang_s=args.hang, seed=args.seed,
                           models=[args.model], api_key=api_key)
    server.start()
    # The first line is the base URL alone, so a parent process can read it (with --port 0).
    print(server.base_url, flush=True)
    print(f"fake VLM endpoint (model {args.model}); Ctrl-C or SIGTERM to stop", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server._stop.set())
    try:
        server._stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
