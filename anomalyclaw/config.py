"""Run settings: the VLM endpoint (from flags or the environment) and the agent's knobs.

Secrets come only from the environment or an explicit argument, are held as ``SecretStr`` and
are scrubbed from log records by :func:`install_secret_redaction`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pydantic import SecretStr

from .errors import ConfigError

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


@dataclass(frozen=True)
class EndpointConfig:
    """Where the VLM lives and how to talk to it."""

    base_url: str | None = None
    """OpenAI-compatible base URL, e.g. http://localhost:8000/v1 for vLLM."""
    model: str | None = None
    """Model name the endpoint serves."""
    api_key: SecretStr | None = field(default=None, repr=False)
    """API key; never printed, logged or written to records."""
    timeout_s: float = 120.0
    """Per-request timeout in seconds; ANOMALYCLAW_TIMEOUT_S."""
    max_retries: int = 5
    """Retries on 429, 5xx, timeouts and dropped connections (with backoff and jitter);
    ANOMALYCLAW_MAX_RETRIES."""
    backoff_max_s: float = 30.0
    """Longest single wait between retries (also caps a Retry-After); ANOMALYCLAW_BACKOFF_MAX_S."""
    temperature: float = 0.0
    max_tokens: int = 1024
    client: str = "langchain"
    """``langchain``: ``ChatOpenAI`` (langchain-openai); ``sdk``: the openai SDK's async client
    posting the serialised request directly, ~3x less event-loop CPU per request (see the README's
    performance section); ANOMALYCLAW_CLIENT."""

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

        values: dict[str, Any] = {"base_url": pick(0), "model": pick(2)}
        key = pick(1)
        values["api_key"] = SecretStr(key) if key else None
        if env.get("ANOMALYCLAW_CLIENT"):
            values["client"] = env["ANOMALYCLAW_CLIENT"]
        for name in ("timeout_s", "max_retries", "backoff_max_s"):
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
            values[k] = SecretStr(v) if k == "api_key" and isinstance(v, str) else v
        return cls(**values)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_max_s < 0:
            raise ConfigError(f"backoff_max_s must be >= 0 seconds, got {self.backoff_max_s}")
        if self.client not in CLIENTS:
            raise ConfigError(f"unknown client {self.client!r}: choose one of {', '.join(CLIENTS)}")

    def require(self) -> "EndpointConfig":
        """Check that the endpoint can be used; raise a ConfigError saying what to set."""
        if not self.base_url:
            raise ConfigError("no VLM endpoint: pass --base-url or set ANOMALYCLAW_BASE_URL "
                              "(e.g. http://localhost:8000/v1 for vLLM), or use --backend offline")
        if not self.model:
            raise ConfigError("no model name: pass --model or set ANOMALYCLAW_MODEL")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL {self.base_url!r} must start with http:// or https://")
        return self

    def secret_values(self) -> list[str]:
        return [self.api_key.get_secret_value()] if self.api_key else []

    def public(self) -> dict[str, Any]:
        """Settings safe to write into records and reports (no key)."""
        return {"base_url": self.base_url, "model": self.model, "timeout_s": self.timeout_s,
                "max_retries": self.max_retries, "client": self.client}


@dataclass(frozen=True)
class AgentConfig:
    """The agent's knobs; every field has a default that reproduces the paper's setting."""

    max_turns: int = 3
    """Turns of the refutation loop before a forced commit."""
    alpha: float = 0.5
    """Fusion weight of the direct branch: fused = alpha*direct + (1-alpha)*refute."""
    expert_weight: float = 0.0
    """Weight of the optional frozen-expert term in the fusion (choose it on calibration)."""
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
    """Record the frozen expert's score beside the branches (needed for an expert term)."""
    backbone: str = "classic"
    """Expert backbone: "classic" (no weights), "dinov2" or "clip" (local weights)."""
    backbone_path: str | None = None
    """Local directory or hub name of the backbone weights (offline cache only)."""
    device: str = "auto"

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
        if not 0.0 <= self.expert_weight < 1.0:
            raise ConfigError(f"expert_weight must be in [0, 1), got {self.expert_weight}")
        if self.image_history not in ("once", "all"):
            raise ConfigError(f"image_history must be 'once' or 'all', got {self.image_history!r}")

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
        if any(s in msg for s in self.secrets):
            record.msg = redact(msg, self.secrets)
            record.args = ()
        if record.exc_info and not record.exc_text:
            # Format the traceback now, so the handler prints the redacted text we keep.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and any(s in record.exc_text for s in self.secrets):
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info and any(s in record.stack_info for s in self.secrets):
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


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
