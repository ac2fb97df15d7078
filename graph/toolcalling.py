"""How the refutation branch's model names its tools, and ``auto``'s fallback memory.

- ``json`` (default): the reply's JSON holds the action (``{"tool", "args", "candidate"}`` or
  ``{"commit": true}``), the paper's protocol, which works with any chat endpoint;
- ``native``: each refutation request carries the item's applicable tools as function schemas
  (``bind_tools``); the reply's first tool call is the action, its JSON text still holds the
  scores, verdicts and the candidate the call tests; no tool call means commit;
- ``auto``: native, until the endpoint refuses a request for carrying tools (a vLLM started
  without ``--enable-auto-tool-choice`` answers 400); from then on JSON actions for the rest of
  the run, said once in the log and in the run summary.

One :class:`ToolCalling` is shared by the items of a run (the runner makes it), so the first
refusal switches every later item.
"""
from __future__ import annotations

import logging
import threading

from anomalyclaw.config import TOOL_CALLING
from anomalyclaw.errors import ConfigError
from anomalyclaw.events import emit

log = logging.getLogger(__name__)


class ToolCalling:
    """A run's tool-calling mode and, for ``auto``, whether it fell back to JSON and why."""

    def __init__(self, mode: str = "json"):
        if mode not in TOOL_CALLING:
            raise ConfigError(f"tool_calling must be one of {', '.join(TOOL_CALLING)}, got {mode!r}")
        self.mode = mode
        self.fallback: str | None = None
        """Why ``auto`` switched to JSON actions (None while it has not)."""
        self._lock = threading.Lock()

    def native(self) -> bool:
        """Whether a new conversation calls tools natively."""
        return self.mode == "native" or (self.mode == "auto" and self.fallback is None)

    def fall_back(self, reason: str) -> bool:
        """Under ``auto``: use JSON actions from now on; True when this call made the switch
        (it logs once). False, and nothing changes, in the other modes."""
        if self.mode != "auto":
            return False
        with self._lock:
            if self.fallback is not None:
                return False
            self.fallback = reason
        log.warning("tool calling auto: %s; JSON actions for the rest of the run", reason[:300])
        emit("tool_calling_fallback", reason=reason[:300])
        return True

    def describe(self) -> str:
        """One phrase for the run summary: ``json``, ``native``, ``auto (native)`` or
        ``auto (fell back to json: REASON)``."""
        if self.mode != "auto":
            return self.mode
        return "auto (native)" if self.fallback is None else f"auto (fell back to json: {self.fallback[:200]})"

    def __repr__(self) -> str:
        return f"ToolCalling({self.describe()})"
