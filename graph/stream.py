"""Streamed updates and events as short text, for a notebook or a script watching a run.

``graph.astream(..., stream_mode="updates")`` yields ``{node: update}`` dicts whose messages and
observations carry images (data URLs, bytes): printing one prints hundreds of KB of base64.
:func:`format_update` writes what each node decided in a line or two instead, and
:func:`format_event` does the same for the ``stream_mode="custom"`` events
(:mod:`anomalyclaw.events`)::

    async for update in graph.astream(new_state(item.item_id), context=ctx, stream_mode="updates"):
        print(format_update(update))
"""
from __future__ import annotations

from typing import Any, Mapping

from langchain_core.messages import BaseMessage

__all__ = ["format_event", "format_update"]


def _num(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:.3f}"


def _cut(text: Any, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compact(value: Any, limit: int = 80) -> str:
    """Any value in at most ``limit``-ish characters, images and bytes by their size only."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value:
            return f"<{value[5:value.index(';')]} data URL, {len(value) // 1024} KB>"
        return repr(_cut(value, limit))
    if isinstance(value, BaseMessage):
        content = value.content
        parts = f"{len(content)} parts" if isinstance(content, list) else _cut(content, 40)
        return f"<{type(value).__name__}: {parts}>"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}: {_compact(v, 30)}" for k, v in list(value.items())[:6])
        return "{" + inner + (", ..." if len(value) > 6 else "") + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_compact(v, 30) for v in value[:4])
        return "[" + inner + (f", ... {len(value)} in all" if len(value) > 4 else "") + "]"
    return _cut(repr(value), limit)


def _action(pending: Mapping[str, Any] | None) -> str:
    if not pending or pending.get("commit"):
        return "commit"
    args = ", ".join(f"{k}={_compact(v, 30)}" for k, v in (pending.get("args") or {}).items())
    return f"{pending.get('tool')}({args}) on {pending.get('candidate') or '-'}"


def _node(node: str, out: Mapping[str, Any], width: int) -> list[str]:
    if node == "direct":
        if out.get("direct_error"):
            return [f"direct: no score ({_cut(out['direct_error'], width)})"]
        return [f"direct: {out.get('direct_label')} (confidence {_num(out.get('direct_confidence'))}) -> "
                f"score {_num(out.get('direct_score'))}"]
    if node == "propose":
        row = (out.get("history") or [{}])[-1]
        if row.get("error"):
            return [f"propose: failed ({_cut(row['error'], width)})"]
        lines = [f"propose: initial score {_num(out.get('initial_score'))}, {len(out.get('candidates') or [])} "
                 f"candidate(s); next: {_action(out.get('pending'))}"]
        lines += [f"  {c['id']}: {_cut(c.get('description', ''), width - 30)}"
                  + (f" bbox {c['bbox']}" if c.get("bbox") else "") for c in out.get("candidates") or []]
        return lines
    if node == "select_tool":
        call = out.get("call")
        if out.get("route") == "commit" or not call:
            return [f"select_tool: -> commit{' (turn limit)' if out.get('forced') else ''}"]
        if "rejected" in call:
            return [f"select_tool: -> observe, {call.get('tool')} rejected: "
                    f"{_cut(call['rejected'].get('error'), width)}"]
        args = ", ".join(f"{k}={_compact(v, 30)}" for k, v in (call.get("args") or {}).items())
        return [f"select_tool: -> observe {call.get('tool')}({args}) on {call.get('candidate') or '-'}"]
    if node == "observe":
        lines = []
        for obs in out.get("observations") or []:
            data = obs.get("data") or {}
            images = ", ".join(im.get("name", "?") for im in obs.get("images") or [])
            lines.append(f"observe: {obs.get('tool')} {'ok' if obs.get('ok') else 'not run'} in "
                         f"{obs.get('elapsed_s', 0):.2f} s, evidence {_num(data.get('evidence'))}"
                         + (f", images: {images}" if images else ""))
            lines.append(f"  {_cut(obs.get('text', ''), width)}")
        return lines or ["observe: -"]
    if node == "refute":
        row = (out.get("history") or [{}])[-1]
        if row.get("error"):
            return [f"refute (turn {out.get('turn')}): failed ({_cut(row['error'], width)})"]
        verdicts = "; ".join(f"{v['id']} {v['status']}" for v in out.get("verdicts") or []) or "no verdict"
        return [f"refute (turn {out.get('turn')}): {verdicts}; score {_num(out.get('score'))}; "
                f"next: {_action(out.get('pending'))}"]
    if node == "commit":
        if out.get("refute_error"):
            return [f"commit: no score ({_cut(out['refute_error'], width)})"]
        forced = " (forced at the turn limit)" if any(r.get("forced") for r in out.get("history") or []) else ""
        return [f"commit{forced}: refute score {_num(out.get('refute_score'))}"]
    if node == "fuse":
        w = out.get("weights") or {}
        return [f"fuse: anomaly score {_num(out.get('anomaly_score'))} (weights direct {w.get('direct')}, "
                f"refute {_num(w.get('refute'))}, expert {w.get('expert')}; expert score "
                f"{_num(out.get('expert_score'))})"]
    fields = ", ".join(f"{k}={_compact(v)}" for k, v in out.items())
    return [f"{node}: {_cut(fields, width * 2)}"]


def format_update(update: Any, *, width: int = 110) -> str:
    """One ``stream_mode="updates"`` chunk (``{node: update}``, or ``(namespace, {node: update})``
    with subgraphs) as a few short lines: the decision each node made, never image data."""
    if isinstance(update, tuple) and len(update) == 2 and isinstance(update[1], Mapping):
        update = update[1]
    if not isinstance(update, Mapping):
        return _compact(update, width)
    lines: list[str] = []
    for node, out in update.items():
        if node == "__interrupt__":
            lines.append(f"interrupted: {_compact(out, width)}")
        elif isinstance(out, Mapping):
            lines += _node(str(node), out, width)
        else:
            lines.append(f"{node}: {_compact(out, width)}")
    return "\n".join(lines)


def format_event(event: Mapping[str, Any]) -> str:
    """One ``stream_mode="custom"`` event of the project's (``{"event": ..., ...}``) as a line."""
    kind = event.get("event")
    if kind == "tool_start":
        return f"tool {event.get('tool')} started"
    if kind == "tool_end":
        status = "ok" if event.get("ok") else f"failed ({_cut(event.get('error'), 80)})"
        return (f"tool {event.get('tool')} {status} in {1000 * (event.get('latency_s') or 0):.0f} ms, evidence "
                f"{_num(event.get('evidence'))}, {len(event.get('images') or [])} image(s)")
    if kind == "vlm_request":
        extra = " (repair)" if event.get("repair") else ""
        return f"VLM {event.get('stage')} request sent{extra}" + (f" with {event['tools']} tools" if event.get("tools") else "")
    if kind == "vlm_reply":
        tokens = (f"{event['prompt_tokens']}+{event.get('completion_tokens')} tokens, "
                  if event.get("prompt_tokens") is not None else "")
        return (f"VLM {event.get('stage')} answered in {1000 * (event.get('latency_s') or 0):.0f} ms, {tokens}"
                f"{(event.get('request_bytes') or 0) / 1024:.0f} KB sent, {event.get('images_sent')} image(s)"
                + (f", tool calls {event['tool_calls']}" if event.get("tool_calls") else ""))
    if kind == "vlm_repair":
        return f"VLM {event.get('stage')} reply unusable, repair retry: {_cut(event.get('problem'), 100)}"
    if kind == "vlm_retry":
        return f"VLM {event.get('stage')} retry {event.get('attempt')} in {event.get('wait_s')} s: {_cut(event.get('reason'), 100)}"
    if kind == "vlm_error":
        return f"VLM {event.get('stage')} failed: {_cut(event.get('error'), 120)}"
    return _compact(dict(event), 160)
