"""Custom stream events: what a run is doing, as LangGraph's ``stream_mode="custom"`` shows it.

Tools and the VLM seam call :func:`emit` (tool started and finished with its latency, VLM request
sent and answered with tokens and bytes, a repair, a retry); inside a graph run the event goes
to the run's stream writer, so ``graph.astream(..., stream_mode="custom")`` yields it, and
anywhere else (a tool run by hand, a script calling the VLM) ``emit`` does nothing.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EVENTS", "emit"]

#: The events the project emits, by name.
EVENTS = ("tool_start", "tool_end", "vlm_request", "vlm_reply", "vlm_repair", "vlm_retry", "vlm_error",
          "tool_calling_fallback")


def emit(event: str, **fields: Any) -> None:
    """Send ``{"event": event, **fields}`` to the running graph's custom stream, if any."""
    try:
        from langgraph.config import get_stream_writer

        writer = get_stream_writer()
    except (RuntimeError, KeyError, ImportError):  # not inside a LangGraph run
        return
    writer({"event": event, **fields})
