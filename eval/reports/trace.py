"""A finished item's trajectory as text, turn by turn (``anomalyclaw trace``)."""
from __future__ import annotations

import json
import textwrap

from anomalyclaw.eval.running.records import Record


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))


def format_trace(rec: Record) -> str:
    """Header with scores, then each turn: stage, candidates or verdicts, tool call, observation."""
    wrap = textwrap.TextWrapper(width=100, initial_indent="      ", subsequent_indent="      ")
    lines = [f"item {rec.item_id}  domain {rec.domain_code}  label {_fmt(rec.label_gt)}  backend {rec.backend}",
             f"scores: fused {_fmt(rec.anomaly_score)}  direct {_fmt(rec.direct_score)}  "
             f"refute {_fmt(rec.refute_score)}  expert {_fmt(rec.expert_score)}"]
    extra = rec.model_extra or {}
    if rec.mode == "mcqa":
        answers = extra.get("mcq_answer") or {}
        lines[1] = (f"question ({extra.get('question_type')}): {extra.get('question')}  correct {extra.get('answer')}  "
                    f"direct {_fmt(answers.get('direct'))}  refute {_fmt(answers.get('refute'))}")
        lines.extend(f"    {k}. {v}" for k, v in (extra.get("options") or {}).items())
    if rec.error:
        lines.append(f"ERROR: {rec.error}")
    if rec.direct_rationale and rec.mode == "mcqa":
        lines.append(f"direct: {json.loads(rec.direct_rationale).get('text', rec.direct_rationale)!r}"
                     if rec.direct_rationale.startswith("{") else f"direct: {rec.direct_rationale}")
    elif rec.direct_rationale:
        try:
            direct = json.loads(rec.direct_rationale)
            lines.append(f"direct: {direct.get('image_label')} (confidence {_fmt(direct.get('confidence'))}) "
                         f"{direct.get('evidence') or ''}".rstrip())
        except (json.JSONDecodeError, AttributeError):
            lines.append(f"direct: {rec.direct_rationale}")
    for row in rec.history:
        if not isinstance(row, dict):
            lines.append(f"  {row}")
            continue
        head = f"turn {row.get('turn')} [{row.get('stage', row.get('mode', '?'))}]"
        if row.get("anomaly_score") is not None:
            head += f" score {_fmt(row.get('anomaly_score'))}"
        if row.get("answer") is not None:
            head += f" answer {row['answer']}"
        lines.append(head)
        for c in row.get("candidates") or []:
            lines.append(f"    candidate {c.get('id')}: {c.get('description')} bbox={c.get('bbox')}")
        if row.get("tool"):
            lines.append(f"    tool {row['tool']} args={json.dumps(row.get('args'))} on {row.get('candidate')}")
        if row.get("observation"):
            lines.append("    observation:")
            lines.extend(wrap.wrap(str(row["observation"])))
        for v in row.get("verdicts") or []:
            lines.append(f"    verdict {v.get('id')}: {v.get('status')} — {v.get('evidence')}")
        action = row.get("action")
        if isinstance(action, dict):
            nxt = "commit" if action.get("commit") else f"call {action.get('tool')} {json.dumps(action.get('args'))}"
            lines.append(f"    next: {nxt}")
        elif action:
            lines.append(f"    next: {action} {row.get('tool') or ''}".rstrip())
        if row.get("rationale") or row.get("thought"):
            lines.extend(wrap.wrap(f"why: {row.get('rationale') or row.get('thought')}"))
        if row.get("error"):
            lines.append(f"    error: {row['error']}")
    if rec.fallbacks:
        lines.append("fallbacks: " + "; ".join(rec.fallbacks))
    usage = rec.usage or {}
    if usage:
        lines.append(f"cost: {usage.get('requests')} VLM requests, {usage.get('request_bytes')} request bytes, "
                     f"{usage.get('images_sent')} images, {usage.get('retries')} retries; "
                     f"{_fmt((rec.timings or {}).get('total_s'))} s")
    return "\n".join(lines)
