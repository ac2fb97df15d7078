"""Run settings: the VLM endpoint (from flags or the environment) and the agent's knobs.

Secrets come only from the environment or an explicit argument, are held as ``SecretStr`` and
are scrubbed from log records by :func:`install_secret_redaction`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Iterable

from pydantic import SecretStr

from .errors import ConfigError
from .scores import DEFAULT_EXPERT_WEIGHT, check_expert_weight

log = logging.getLogger(__name__)

#: Environment variable names per preset: (base URL, API key, model). ANOMALYCLAW_* always wins
#: over a preset's own variables only when no preset is named.
PRESETS: dict[str, tuple[str, str, str]] = {
    "anomalyclaw": ("ANOMALYCLAW_BASE_URL", "ANOMALYCLAW_API_KEY", "ANOMALYCLAW_MODEL"),
    "qwen": ("QWEN_API_BASE", "QWEN_API_KEY", "QWEN_MODEL"),
    "gpt": ("GPT_API_BASE", "GPT_API_KEY", "GPT_MODEL"),
    "seed": ("SEED_API_BASE", "SEED_API_KEY", "SEED_MODEL"),
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL"),
}

#: How the ``openai`` backend talks to its endpoint (see :attr:`EndpointConfig.client`).
CLIENTS = ("langchain", "sdk")
#: The HTTP stack under both clients (see :attr:`EndpointConfig.transport`).
TRANSPORTS = ("aiohttp", "httpx")
#: How the refutation branch's model calls its tools (see :attr:`AgentConfig.tool_calling`).
TOOL_CALLING = ("json", "native", "auto")


@dataclass(frozen=True)
class EndpointConfig:
    """Where the VLM lives and how to talk to it."""

    base_url: str | None = None
    """OpenAI-compatible base URL, e.g. http://localhost:8000/v1 for vLLM; several replicas of
    one endpoint comma-separated (``--base-url`` given several times; see :attr:`base_urls`)."""
    model: str | None = None
    """Model name the endpoint serves."""
    api_key: SecretStr | None = field(default=None, repr=False)
    """API key; never printed, logged or written to records."""
    timeout_s: float = 120.0
    """Total deadline of one request in seconds (connect, send and the whole reply), retried
    after it like a dropped connection; ANOMALYCLAW_TIMEOUT_S."""
    max_retries: int = 5
    """Retries on 429, 5xx, timeouts and dropped connections (with backoff and jitter);
    ANOMALYCLAW_MAX_RETRIES."""
    backoff_max_s: float = 30.0
    """Longest single wait between retries (also caps a Retry-After); ANOMALYCLAW_BACKOFF_MAX_S."""
    temperature: float = 0.0
    max_tokens: int = 1024
    max_reply_bytes: int = 4 * 2**20
    """Largest reply body read (decoded); a larger one is an unreadable reply, retried.
    A completion of ``max_tokens`` tokens is a few kilobytes; ANOMALYCLAW_MAX_REPLY_BYTES."""
    client: str = "langchain"
    """``langchain``: ``ChatOpenAI`` (langchain-openai); ``sdk``: the openai SDK's async client
    posting the serialised request directly, ~3x less event-loop CPU per request (see the README's
    performance section); ANOMALYCLAW_CLIENT."""
    transport: str = "aiohttp"
    """The HTTP stack under either client: ``aiohttp`` (the openai SDK's ``DefaultAioHttpClient``,
    a C parser and a connection pool that checks no idle sockets per request: a quarter less
    event-loop CPU per item, README "Performance") or ``httpx`` (the SDK's default);
    ANOMALYCLAW_TRANSPORT."""
    preset: str | None = None
    """The preset whose variables were read (``--preset``), so that errors name them."""
    rest_after: int = 3
    """With several replicas: consecutive connection failures, timeouts or 5xx after which a
    replica rests (gets no requests while another is available; 1 s, then doubling up to
    ``backoff_max_s``); ANOMALYCLAW_REST_AFTER."""
    down_after_s: float = 60.0
    """A replica that failed every request for this long is down; when every replica is, the run
    stops (exit status 3) naming each; ANOMALYCLAW_DOWN_AFTER_S."""

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The replicas' base URLs (``base_url`` split at commas and spaces, duplicates dropped)."""
        urls = [u.strip().rstrip("/") for u in re.split(r"[,\s]+", self.base_url or "") if u.strip()]
        return tuple(dict.fromkeys(urls))

    def for_url(self, url: str) -> "EndpointConfig":
        """These settings for one replica."""
        return replace(self, base_url=url)

    @classmethod
    def from_env(cls, preset: str | None = None, env: dict[str, str] | None = None,
                 **overrides: Any) -> "EndpointConfig":
        """Settings from ``overrides`` (flags) first, then the preset's variables, then
        ANOMALYCLAW_*; ``None`` overrides are ignored."""
        env = dict(os.environ if env is None else env)
        order = [preset] if preset else []
        if preset and preset not in PRESETS:
            raise ConfigError(f"unknown endpoint preset {preset!r}; choose one of {sorted(PRESETS)}")
        order += ["anomalyclaw"]

        def pick(index: int) -> str | None:
            for name in order:
                value = env.get(PRESETS[name][index])
                if value:
                    return value
            return None

        values: dict[str, Any] = {"base_url": pick(0), "model": pick(2), "preset": preset}
        key = pick(1)
        values["api_key"] = SecretStr(key) if key else None
        key_source = next((PRESETS[n][1] for n in order if env.get(PRESETS[n][1])), "the API key")
        for name in ("client", "transport"):
            if env.get(f"ANOMALYCLAW_{name.upper()}"):
                values[name] = env[f"ANOMALYCLAW_{name.upper()}"]
        for name in ("timeout_s", "max_retries", "backoff_max_s", "max_reply_bytes", "rest_after", "down_after_s"):
            raw = env.get(f"ANOMALYCLAW_{name.upper()}")
            if raw:
                try:
                    values[name] = type(getattr(cls, name))(raw)
                except ValueError:
                    raise ConfigError(f"ANOMALYCLAW_{name.upper()}={raw!r} is not a number") from None
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in {f.name for f in fields(cls)}:
                raise ConfigError(f"unknown endpoint setting {k!r}")
            if k == "base_url" and isinstance(v, (list, tuple)):  # --base-url given several times
                v = ",".join(str(u) for u in v)
            values[k] = SecretStr(v) if k == "api_key" and isinstance(v, str) else v
            if k == "api_key":
                key_source = "the api_key argument"
        if values.get("api_key") is not None:
            values["api_key"] = SecretStr(check_api_key(values["api_key"].get_secret_value(), source=key_source))
        return cls(**values)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_max_s < 0:
            raise ConfigError(f"backoff_max_s must be >= 0 seconds, got {self.backoff_max_s}")
        if self.max_reply_bytes < 1024:
            raise ConfigError(f"max_reply_bytes must be at least 1024, got {self.max_reply_bytes}")
        if self.client not in CLIENTS:
            raise ConfigError(f"unknown client {self.client!r}: choose one of {', '.join(CLIENTS)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r} (ANOMALYCLAW_TRANSPORT): choose one of "
                              f"{', '.join(TRANSPORTS)}")
        if self.rest_after < 1:
            raise ConfigError(f"rest_after must be >= 1, got {self.rest_after}")
        if not self.down_after_s > 0:
            raise ConfigError(f"down_after_s must be > 0 seconds, got {self.down_after_s}")
        if self.api_key is not None:  # also when built directly, not through from_env
            raw = self.api_key.get_secret_value() if isinstance(self.api_key, SecretStr) else str(self.api_key)
            object.__setattr__(self, "api_key", SecretStr(check_api_key(raw, warn=False)))

    def variables(self) -> tuple[str, str, str]:
        """The environment variables these settings are read from: (base URL, key, model)."""
        return PRESETS[self.preset] if self.preset in PRESETS else PRESETS["anomalyclaw"]

    def _unset(self, index: int) -> str:
        ours = PRESETS["anomalyclaw"][index]
        if self.preset and self.preset in PRESETS:
            return f"--preset {self.preset} reads {PRESETS[self.preset][index]} (then {ours}), and neither is set"
        return f"{ours} is not set"

    def require(self) -> "EndpointConfig":
        """Check that the endpoint can be used; raise a ConfigError saying what to set."""
        if not self.base_url:
            raise ConfigError(f"no VLM endpoint: {self._unset(0)}; set one (e.g. http://localhost:8000/v1 for "
                              "vLLM) or pass --base-url, or use --backend offline")
        if not self.model:
            raise ConfigError(f"no model name: {self._unset(2)}; set one or pass --model")
        for url in self.base_urls or (self.base_url,):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"base URL {url!r} must start with http:// or https://")
        return self

    def secret_values(self) -> list[str]:
        return [self.api_key.get_secret_value()] if self.api_key else []

    def public(self) -> dict[str, Any]:
        """Settings safe to write into records and reports (no key)."""
        return {"base_url": ",".join(self.base_urls) or self.base_url, "model": self.model,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries, "client": self.client}


@dataclass(frozen=True)
class AgentConfig:
    """The agent's knobs; every field has a default that reproduces the paper's setting."""

    max_turns: int = 3
    """Turns of the refutation loop before a forced commit."""
    alpha: float = 0.5
    """Fusion weight of the direct branch: fused = alpha*direct + (1-alpha)*refute."""
    expert_weight: float = DEFAULT_EXPERT_WEIGHT
    """Weight w of the frozen-expert term in the fusion, ``(blend + 4w*u) / (1 + 4w)`` with ``u``
    the logistic of the mean z-score of the patch-kNN and subspace experts against the item's
    references (``anomalyclaw.scores``). 0.2 by default, the same for every backbone (chosen on
    the released Qwen3.5-VL-27B records); 0 is the paper's two-branch blend exactly."""
    direct_score: str = "verbalized"
    """"verbalized" (confidence in the label) or "logprob" (P(anomalous) from token log-probs)."""
    work_side: int = 512
    """Longest side at which tools and experts process images."""
    n_refs_shown: int = 4
    """How many references the VLM sees in the first message (the closest ones; tools use all)."""
    image_side: int = 768
    """Longest side of the query (and tool images) as sent to the VLM, in pixels."""
    reference_side: int = 512
    """Longest side of reference images as sent to the VLM (they need less detail)."""
    image_format: str = "JPEG"
    """PNG or JPEG for the query and references sent to the VLM."""
    image_history: str = "once"
    """"once": each image is sent once per conversation; "all": resend the whole history."""
    max_candidates: int = 4
    """Candidates a proposal may list."""
    expert_score: bool = True
    """Compute the experts' scores and record them beside the branches. False skips the experts
    (faster): the fusion is then the blend and the record says expert weight 0."""
    backbone: str = "classic"
    """Expert backbone: "classic" (no weights), "dinov2" or "clip" (local weights)."""
    backbone_path: str | None = None
    """Local directory or hub name of the backbone weights (offline cache only)."""
    device: str = "auto"
    tool_calling: str = "json"
    """How the refutation model calls tools: "json" (a JSON action in the reply: the paper's
    protocol, any endpoint), "native" (the chat model bound to the item's tools; its tool calls
    are the actions) or "auto" (native until the endpoint refuses tools, then JSON for the rest
    of the run)."""
    anomaly_maps: bool = True
    """Whether the last node encodes the agent's and the expert's anomaly maps as PNG
    (``localization["map_png"]``, ``["expert_map_png"]``); the boxes are found either way.
    ``run --no-maps`` turns it off, saving the encoding's CPU (about 2 ms per map at the maps'
    256 px, ``graph.localization.MAP_SIDE``)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.direct_score not in ("verbalized", "logprob"):
            raise ConfigError(f"direct_score must be 'verbalized' or 'logprob', got {self.direct_score!r}")
        if self.image_format.upper() not in ("PNG", "JPEG", "JPG"):
            raise ConfigError(f"image_format must be PNG or JPEG, got {self.image_format!r}")
        if min(self.image_side, self.reference_side, self.work_side) < 64:
            raise ConfigError("image_side, reference_side and work_side must be at least 64 px")
        try:
            check_expert_weight(self.expert_weight)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.image_history not in ("once", "all"):
            raise ConfigError(f"image_history must be 'once' or 'all', got {self.image_history!r}")
        if self.tool_calling not in TOOL_CALLING:
            raise ConfigError(f"tool_calling must be one of {', '.join(TOOL_CALLING)}, got {self.tool_calling!r}")

    def with_(self, **changes: Any) -> "AgentConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class _RedactingFilter(logging.Filter):
    """Replaces secrets in a record's message, traceback and stack text before any handler
    formats it."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # Format the traceback now, so the handler prints the redacted text we keep.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


#: Secrets shorter than this are blanked only where they stand as a whole word: a key such as
#: ``1``, ``e`` or ``test`` blanked everywhere it occurs would turn every rationale into noise.
MIN_SECRET_CHARS = 8
_WORD = "A-Za-z0-9_\\-"


def secret_forms(secret: str) -> list[str]:
    """``secret`` as it can appear in text: raw, JSON-escaped (with and without ASCII escapes),
    Python-repr-escaped and URL-quoted (a key with ``"``, ``\\`` or non-ASCII characters that an
    endpoint quotes back), longest first."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             repr(secret)[1:-1], urllib.parse.quote(secret, safe="")}
    return sorted((f for f in forms if f), key=len, reverse=True)


@lru_cache(maxsize=64)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = []
    for s in secrets:
        for form in secret_forms(s):
            if len(s) >= MIN_SECRET_CHARS:
                parts.append(re.escape(form))
            else:  # a short key: only where no word character touches it
                parts.append(f"(?<![{_WORD}]){re.escape(form)}(?![{_WORD}])")
    return re.compile("|".join(parts)) if parts else None


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of every secret (:func:`secret_forms`) replaced by ``***``.

    For plain text only (a message, a log line, a traceback): never for serialised JSON, whose
    syntax a short secret would cut up; use :func:`redact_value` on the values instead.
    """
    pattern = _pattern(tuple(s for s in secrets if s))
    return text if pattern is None or not isinstance(text, str) else pattern.sub("***", text)


def redact_value(value: Any, secrets: Iterable[str]) -> Any:
    """A copy of ``value`` (dicts, lists, strings, numbers: what becomes JSON) with every string
    in it, keys included, passed through :func:`redact`; numbers and the structure stay as they
    are, so the JSON written from it is as valid as the JSON of ``value``."""
    secrets = tuple(s for s in secrets if s)
    if not secrets:
        return value

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v, secrets)
        if isinstance(v, dict):
            return {walk(k) if isinstance(k, str) else k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(value)


def check_api_key(key: str, *, source: str = "the API key", warn: bool = True) -> str:
    """The key with surrounding whitespace (a trailing ``\\r`` or ``\\n`` from a copied line or a
    Windows file) stripped; raises :class:`ConfigError` for a key that is empty after that or
    holds a control character or a space (no HTTP header can carry it as written). A key shorter
    than :data:`MIN_SECRET_CHARS` is kept with a warning: it is blanked from records and logs
    only where it stands as a whole word."""
    stripped = key.strip()
    if not stripped:
        raise ConfigError(f"{source} is empty (only whitespace); set it to the key, or unset it")
    bad = next((i for i, c in enumerate(stripped) if ord(c) < 0x20 or ord(c) == 0x7F or c.isspace()), None)
    if bad is not None:
        raise ConfigError(f"{source} holds a space or control character at position {bad} "
                          f"({stripped[bad]!r}); check how the variable was set")
    if warn and len(stripped) < MIN_SECRET_CHARS:
        log.warning("%s is %d characters long, too short to blank from free text safely: records and logs "
                    "blank it only where it stands as a whole word", source, len(stripped))
    return stripped


def install_secret_redaction(secrets: list[str]) -> None:
    """Scrub ``secrets`` from every log record, whichever logger or handler emits it."""
    if not any(secrets):
        return
    flt = _RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    logging.getLogger().addFilter(flt)
    for name in ("anomalyclaw", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "langchain", "langgraph"):
        logging.getLogger(name).addFilter(flt)
