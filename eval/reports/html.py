"""The HTML page of a run: AUROC summary and plots, then each item's trajectory turn by turn.

Built from ``OUT/records.jsonl`` (or released ``D*.json`` arrays) plus the tool images that
``anomalyclaw run --save-images`` wrote under ``OUT/images/<item>/``. The page is one
self-contained file: no network, no JavaScript; images are embedded as base64 ``data:`` URLs
(or linked, for large runs). Every string that comes from a record is escaped, because model
output is untrusted, and an image path from a record is used only when it names an image file
inside ``OUT/images``.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.imaging import encode_image, load_image, to_data_url

from anomalyclaw.eval.scoring.metrics import domain_order, evaluate
from anomalyclaw.eval.running.records import Record, load_records

REPORT_FILE = "report.html"
#: Longest side of the query and reference thumbnails embedded from the manifest (pixels).
THUMB_SIDE = 256
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

#: History-row keys rendered in their own place; any other key is listed as it is.
_TURN_KEYS = {"turn", "stage", "mode", "anomaly_score", "updated_score", "confidence", "forced",
              "candidates", "remaining_candidate_features", "tool", "args", "candidate", "refutation_target",
              "observation", "obs_ok", "obs_error", "obs_data", "images", "verdicts",
              "refutation_verdict", "feature_status_update", "action", "rationale", "thought",
              "visual_evidence", "error", "reply"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1200px;
 padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;
 vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e2e2e2;padding:6px;white-space:pre-wrap;word-break:break-word;
 margin:.3em 0}
details.item{border:1px solid #ccc;border-radius:4px;margin:.5em 0;padding:.3em .8em}
details.item>summary{cursor:pointer;font-weight:600}
details.item.error{border-color:#c33;background:#fff6f6}
.turn{border-left:3px solid #88a;padding:.1em .8em;margin:.8em 0}
.turn.failed{border-left-color:#c33}
.muted{color:#666}.bad{color:#b00;font-weight:600}.warn{color:#a60}
.confirmed{color:#b00;font-weight:600}.refuted{color:#070;font-weight:600}.uncertain{color:#a60;font-weight:600}
.images{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}figcaption{font-size:12px;color:#555;max-width:360px;
 word-break:break-all}
img.tool{max-width:520px;max-height:360px;border:1px solid #ddd}
.thumb{position:relative;display:inline-block;line-height:0}.thumb img{max-width:256px;border:1px solid #ddd}
.thumb svg{position:absolute;left:0;top:0;width:100%;height:100%}
.note{background:#fff8e1;border:1px solid #f0d890;padding:4px 8px;margin:.5em 0}
img.plot{max-width:100%;border:1px solid #eee}
"""


def e(value: Any) -> str:
    """``value`` as escaped HTML text (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else e(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _anchor(item_id: str, used: set[str]) -> str:
    """A unique HTML id for an item (ids may hold any characters)."""
    base = "item-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", item_id) or "_")
    anchor, n = base, 1
    while anchor in used:
        n += 1
        anchor = f"{base}-{n}"
    used.add(anchor)
    return anchor


def _valid_bbox(value: Any) -> list[float] | None:
    """A normalized [x0, y0, x1, y1] box, or None when ``value`` is not one (released records
    hold pixel boxes and strings; those are shown as text, not drawn)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        return None
    return [x0, y0, x1, y1]


# ------------------------------------------------------------------------------------- images

class _Images:
    """Turns image files into ``<img>`` sources: embedded ``data:`` URLs or links from the page."""

    def __init__(self, run_dir: Path | None, page_dir: Path, embed: bool):
        self.run_dir = run_dir.resolve() if run_dir is not None else None
        self.page_dir = page_dir.resolve()
        self.embed = embed

    def tool_image(self, rel: Any) -> str:
        """A ``<figure>`` for one saved tool image named in a record (relative to the run folder)."""
        if self.run_dir is None:
            return f'<p class="muted">image {e(rel)} (no run folder to read it from)</p>'
        root = (self.run_dir / "images").resolve()
        path = (self.run_dir / str(rel)).resolve() if isinstance(rel, str) else None
        # The path comes from a record: only image files inside OUT/images may be read.
        if path is None or not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES:
            return f'<p class="bad">image path {e(rel)} refused: not an image file under {e(root)}</p>'
        if not path.is_file():
            return f'<p class="warn">image {e(rel)} is missing from {e(self.run_dir)}</p>'
        if self.embed:
            src = f"data:{IMAGE_SUFFIXES[path.suffix.lower()]};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        else:
            src = self._link(path)
        return (f'<figure><img class="tool" src="{e(src)}" alt="{e(path.name)}">'
                f"<figcaption>{e(path.stem)}</figcaption></figure>")

    def thumbnail(self, path: Path, label: str, boxes: Sequence[tuple[list[float], str, str]] = ()) -> str:
        """A manifest image (query or reference) at :data:`THUMB_SIDE`, with ``boxes`` drawn as
        (normalized bbox, colour, title) rectangles over it."""
        try:
            if self.embed:
                src = to_data_url(encode_image(load_image(path, max_side=THUMB_SIDE), "JPEG"))
            else:
                if not Path(path).is_file():
                    raise FileNotFoundError(path)
                src = self._link(Path(path))
        except (AnomalyClawError, OSError) as exc:
            return f'<figure><p class="warn">{e(label)}: cannot read {e(path)} ({e(exc)})</p></figure>'
        rects = "".join(
            f'<rect x="{b[0]:.4f}" y="{b[1]:.4f}" width="{b[2] - b[0]:.4f}" height="{b[3] - b[1]:.4f}" '
            f'fill="none" stroke="{colour}" stroke-width="0.008"><title>{e(title)}</title></rect>'
            for b, colour, title in boxes)
        svg = f'<svg viewBox="0 0 1 1" preserveAspectRatio="none">{rects}</svg>' if rects else ""
        return (f'<figure><div class="thumb"><img src="{e(src)}" alt="{e(label)}">{svg}</div>'
                f"<figcaption>{e(label)}</figcaption></figure>")

    def _link(self, path: Path) -> str:
        try:
            return Path(os.path.relpath(path, self.page_dir)).as_posix()
        except ValueError:  # another drive (Windows): only an absolute URI reaches it
            return path.as_uri()


def _png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ------------------------------------------------------------------------------------ summary

def _run_info(run_dir: Path | None) -> list[dict[str, Any]]:
    """The ``run_*.json`` files the runner wrote (one per start or resume), oldest first."""
    if run_dir is None or not run_dir.is_dir():
        return []
    infos = []
    for p in sorted(run_dir.glob("run_*.json")):
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(info, dict):
            infos.append(info)
    return infos


def _run_section(records: Sequence[Record], infos: list[dict[str, Any]], source: str) -> str:
    backends = sorted({f"{r.backend} ({r.model})" for r in records if r.backend})
    n_err = sum(1 for r in records if r.error)
    rows = [("records", f"{len(records)} from {source}"), ("errors", str(n_err)),
            ("backend", ", ".join(backends) or "–")]
    if infos:
        last = infos[-1]
        rows += [("run", f"{last.get('run_id')} (started {last.get('started_at')})"
                  + (f"; {len(infos)} starts (resumed)" if len(infos) > 1 else "")),
                 ("prompts", last.get("prompts")), ("tools", ", ".join(map(str, last.get("tools") or []))),
                 ("config", _json(last.get("config")))]
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    note = ""
    if any(r.backend == "offline" for r in records):
        note = ('<p class="note">Backend <b>offline</b>: the embedded rule-based stand-in for a VLM, which '
                "decides from tool and expert numbers. Its scores show that the pipeline works, not how a "
                "vision-language model judges.</p>")
    return f"<h2>Run</h2>{note}<table>{body}</table>"


def _metrics_section(records: Sequence[Record], alpha: float) -> str:
    result = evaluate(records, alpha=alpha)  # fused at the records' own expert weight
    weight = result["expert_weight"]
    if not result["kept"]:
        return ("<h2>AUROC</h2><p class=\"muted\">No record has a label, both branch scores and no error: "
                "nothing to evaluate.</p>")
    cols = list(result["macro_auroc"])
    head = "<tr><th>domain</th><th>n</th><th>anomalous</th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"
    rows = [f"<tr><td>{e(code)}</td><td class=num>{d['n']}</td><td class=num>{d['n_anomalous']}</td>"
            + "".join(f"<td class=num>{_num(d[c], 4)}</td>" for c in cols) + "</tr>"
            for code, d in result["per_domain"].items()]
    rows.append(f"<tr><th>macro</th><td class=num>{result['kept']}</td><td></td>"
                + "".join(f"<td class=num><b>{_num(result['macro_auroc'][c], 4)}</b></td>" for c in cols) + "</tr>")
    left_out = result["rows"] - result["kept"]
    note = (f'<p class="muted">{left_out} of {result["rows"]} records left out (error, a missing branch score '
            "or a missing label).</p>") if left_out else ""
    # A plot with no domain holding both classes would be empty axes.
    has_curve = any(math.isfinite(v) for v in result["macro_auroc"].values())
    plots = _plots(records, result, alpha, weight) if has_curve else ""
    fused = (f"fused = the blend with the expert term at weight {weight:g}" if weight
             else "fused = the blend (no expert term)")
    return (f"<h2>AUROC per domain</h2><p class=\"muted\">Blend = {alpha:g} × direct + {1 - alpha:g} × refute; "
            f"{fused}; n/a: a domain with one class only (left out of the macro mean).</p>"
            f"<table>{head}{''.join(rows)}</table>{note}{plots}")


def _plots(records: Sequence[Record], result: dict, alpha: float, weight: float = 0.0) -> str:
    from anomalyclaw.eval.reports.plots import plot_domain_bars, plot_roc_curves  # matplotlib only when a page has plots

    with tempfile.TemporaryDirectory(prefix="anomalyclaw-report-") as tmp:
        roc = plot_roc_curves(records, Path(tmp) / "roc_curves.png", alpha=alpha, expert_weight=weight)
        bars = plot_domain_bars(result, Path(tmp) / "domain_auroc.png")
        return (f'<h3>ROC curves</h3><img class="plot" src="{_png_data_url(roc)}" alt="ROC curves per domain">'
                f'<h3>AUROC by domain</h3><img class="plot" src="{_png_data_url(bars)}" alt="AUROC per domain">')


def _index_section(records: Sequence[Record], anchors: dict[str, str]) -> str:
    head = ("<tr><th>item</th><th>domain</th><th>label</th><th>fused</th><th>direct</th><th>refute</th>"
            "<th>turns</th><th>tools</th><th>status</th></tr>")
    rows = []
    for r in records:
        status = ('<span class="bad">error</span>' if r.error
                  else f'<span class="warn">{len(r.fallbacks)} fallback(s)</span>' if r.fallbacks else "ok")
        rows.append(f'<tr><td><a href="#{e(anchors[r.item_id])}">{e(r.item_id)}</a></td>'
                    f"<td>{e(r.domain_code or r.domain or '?')}</td><td>{_label(r.label_gt)}</td>"
                    f"<td class=num>{_num(r.anomaly_score)}</td><td class=num>{_num(r.direct_score)}</td>"
                    f"<td class=num>{_num(r.refute_score)}</td><td class=num>{r.n_turns}</td>"
                    f"<td>{e(', '.join(map(str, r.tools_used)))}</td><td>{status}</td></tr>")
    return f"<h2>Items</h2><table>{head}{''.join(rows)}</table>"


def _label(label: int | None) -> str:
    return {1: "anomalous", 0: "normal"}.get(label, "–") if label in (0, 1, None) else e(label)


# -------------------------------------------------------------------------------------- items

def _item_section(r: Record, anchor: str, images: _Images, item: Any, *, open_: bool) -> str:
    title = (f"{e(r.item_id)} · {e(r.domain_code or r.domain or '?')} · {_label(r.label_gt)}"
             f" · fused {_num(r.anomaly_score)}" + (' · <span class="bad">error</span>' if r.error else ""))
    parts = [_scores_table(r)]
    parts.append(_errors(r))
    if item is not None:
        parts.append(_item_images(r, item, images))
    parts.append(_direct(r))
    turns = [_turn(row, images) for row in r.history]
    parts.append("<h3>Refutation trajectory</h3>" + ("".join(turns) or '<p class="muted">no turns recorded</p>'))
    if r.rationale:
        parts.append(f"<h3>Final rationale</h3><p>{e(r.rationale)}</p>")
    parts.append(_cost(r))
    cls = "item error" if r.error else "item"
    return (f'<details class="{cls}" id="{e(anchor)}"{" open" if open_ else ""}><summary>{title}</summary>'
            + "".join(p for p in parts if p) + "</details>")


def _scores_table(r: Record) -> str:
    cells = [("fused", r.anomaly_score), ("direct", r.direct_score), ("refute", r.refute_score),
             ("expert", r.expert_score), ("initial", r.v9_initial_score), ("last update", r.v9_updated_score)]
    head = "".join(f"<th>{k}</th>" for k, _ in cells)
    body = "".join(f"<td class=num>{_num(v)}</td>" for _, v in cells)
    weights = f"weights: direct {_num(r.w_direct, 2)}, refute {_num(r.w_v9, 2)}, expert {_num(r.w_expert, 2)}"
    truth = f"ground truth: {_label(r.label_gt)}" + (f" ({e(r.anomaly_type_gt)})" if r.anomaly_type_gt else "")
    extra = " · ".join(x for x in (truth, weights, f"category {e(r.category)}" if r.category else "",
                                   f"confidence {_num(r.confidence, 2)}" if r.confidence is not None else "") if x)
    return f'<table><tr>{head}</tr><tr>{body}</tr></table><p class="muted">{extra}</p>'


def _errors(r: Record) -> str:
    out = []
    for name, value in (("error", r.error), ("direct branch error", r.direct_error),
                        ("refutation branch error", r.refute_error)):
        if value:
            out.append(f'<p class="bad">{e(name)}: {e(value)}</p>')
    if r.fallbacks:
        out.append("<p class=\"warn\">fallbacks:</p><ul>" + "".join(f"<li>{e(f)}</li>" for f in r.fallbacks) + "</ul>")
    return "".join(out)


def _item_images(r: Record, item: Any, images: _Images) -> str:
    """The query with every candidate's bbox (red) and the direct branch's bbox (blue), then the
    references, when the manifest that was run is given."""
    boxes = []
    for c in r.candidate_features:
        if isinstance(c, dict) and (b := _valid_bbox(c.get("bbox"))):
            boxes.append((b, "#e00", f"candidate {c.get('id')}: {c.get('description')}"))
    direct = _direct_reply(r)
    if isinstance(direct, dict) and (b := _valid_bbox(direct.get("bbox"))):
        boxes.append((b, "#06f", f"direct branch: {direct.get('evidence') or ''}"))
    figures = [images.thumbnail(item.query_path, "query", boxes)]
    figures += [images.thumbnail(p, f"reference {k + 1}") for k, p in enumerate(item.ref_paths)]
    drawn = [name for colour, name in (("#e00", "red: candidates"), ("#06f", "blue: direct branch's bbox"))
             if any(b[1] == colour for b in boxes)]
    legend = f' <span class="muted">({", ".join(drawn)})</span>' if drawn else ""
    return f"<h3>Query and references{legend}</h3><div class=\"images\">{''.join(figures)}</div>"


def _direct_reply(r: Record) -> Any:
    if not r.direct_rationale:
        return None
    try:
        return json.loads(r.direct_rationale)
    except (json.JSONDecodeError, TypeError):
        return r.direct_rationale


def _direct(r: Record) -> str:
    reply = _direct_reply(r)
    if reply is None:
        return ""
    if not isinstance(reply, dict):
        return f"<h3>Direct judgment</h3><pre>{e(reply)}</pre>"
    label = reply.get("image_label")
    line = (f"<b>{e(label)}</b>, confidence {_num(reply.get('confidence'), 2)}"
            + (f", type {e(reply.get('anomaly_type'))}" if reply.get("anomaly_type") else "")
            + (f", bbox {e(_json(reply.get('bbox')))}" if reply.get("bbox") is not None else "")
            + f" → direct score {_num(r.direct_score)}")
    evidence = f"<p>{e(reply.get('evidence'))}</p>" if reply.get("evidence") else ""
    return f"<h3>Direct judgment</h3><p>{line}</p>{evidence}"


def _status(status: Any) -> str:
    cls = status if status in ("confirmed", "refuted", "uncertain") else "muted"
    return f'<span class="{cls}">{e(status)}</span>'


def _candidates_table(candidates: Iterable[Any]) -> str:
    rows = []
    for k, c in enumerate(candidates):
        if not isinstance(c, dict):
            rows.append(f"<tr><td>{k}</td><td colspan=3>{e(c)}</td></tr>")
            continue
        # Released records name candidates ("name", "location_hint") instead of id/description/bbox.
        cid = c.get("id", k)
        what = c.get("description") or c.get("name") or ""
        where = c.get("bbox") if c.get("bbox") is not None else c.get("location_hint")
        status = _status(c["status"]) if c.get("status") else (
            f"looks defect-like: {e(c['looks_defect_like'])}" if c.get("looks_defect_like") else "")
        rows.append(f"<tr><td>{e(cid)}</td><td>{e(what)}</td><td>{e(_json(where) if where is not None else '–')}</td>"
                    f"<td>{status}</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>id</th><th>candidate</th><th>where</th><th>status</th></tr>"
            + "".join(rows) + "</table>")


def _action(action: Any) -> str:
    if isinstance(action, dict):
        if action.get("commit"):
            return "commit"
        return f"call {e(action.get('tool'))} {e(_json(action.get('args') or {}))}" + (
            f" on {e(action.get('candidate'))}" if action.get("candidate") else "")
    return e(action) if action else ""


def _turn(row: Any, images: _Images) -> str:
    if not isinstance(row, dict):
        return f'<div class="turn"><pre>{e(row)}</pre></div>'
    # Released rows carry the run's "mode" instead of a stage: it says nothing about the turn.
    stage = row.get("stage")
    score = row.get("anomaly_score", row.get("updated_score"))
    head = (f"Turn {e(row.get('turn', '?'))}" + (f" · {e(stage)}" if stage else "")
            + (f" · score {_num(score)}" if score is not None else "")
            + (f" · confidence {_num(row['confidence'], 2)}" if row.get("confidence") is not None else ""))
    if row.get("forced"):
        head += ' · <span class="warn">forced commit</span>'
    parts = [f"<h4>{head}</h4>"]
    why = row.get("rationale") or row.get("thought")
    if why:
        parts.append(f"<p><i>{e(why)}</i></p>")
    evidence = row.get("visual_evidence")
    if isinstance(evidence, list) and evidence:
        parts.append("<ul>" + "".join(f"<li>{e(v)}</li>" for v in evidence) + "</ul>")
    candidates = row.get("candidates", row.get("remaining_candidate_features"))
    if isinstance(candidates, list) and candidates:
        parts.append("<p>candidates:</p>" + _candidates_table(candidates))
    if row.get("tool"):
        args = row.get("args")
        target = row.get("candidate", row.get("refutation_target"))
        parts.append(f"<p>tool <b>{e(row['tool'])}</b> args <code>{e(args if isinstance(args, str) else _json(args))}</code>"
                     + (f" testing candidate {e(target)}" if target is not None else "") + "</p>")
    if "observation" in row:
        failed = row.get("obs_ok") is False
        parts.append(f"<p>observation{' <span class=bad>(failed)</span>' if failed else ''}:</p>"
                     f"<pre>{e(row.get('observation'))}</pre>")
    if row.get("obs_error"):
        parts.append(f'<p class="bad">tool error: {e(row["obs_error"])}</p>')
    if isinstance(row.get("obs_data"), dict) and row["obs_data"]:
        parts.append(f"<details><summary>measurements</summary><pre>{e(_json(row['obs_data']))}</pre></details>")
    saved = row.get("images")
    if isinstance(saved, list) and saved:
        parts.append('<div class="images">' + "".join(images.tool_image(p) for p in saved) + "</div>")
    verdicts = row.get("verdicts")
    if isinstance(verdicts, list) and verdicts:
        items = "".join(f"<li>{e(v.get('id'))}: {_status(v.get('status'))} — {e(v.get('evidence'))}</li>"
                        if isinstance(v, dict) else f"<li>{e(v)}</li>" for v in verdicts)
        parts.append(f"<p>verdicts:</p><ul>{items}</ul>")
    elif row.get("refutation_verdict"):
        parts.append(f"<p>verdict: {_status(row['refutation_verdict'])} — {e(row.get('feature_status_update'))}</p>")
    action = _action(row.get("action"))
    if action:
        parts.append(f"<p>next: {action}</p>")
    if row.get("error"):
        parts.append(f'<p class="bad">error: {e(row["error"])}</p>')
    if row.get("reply"):
        parts.append(f"<details><summary>raw reply</summary><pre>{e(row['reply'])}</pre></details>")
    other = {k: v for k, v in row.items() if k not in _TURN_KEYS}
    if other:
        parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v if isinstance(v, str) else _json(v))}</td></tr>"
                                        for k, v in other.items()) + "</table>")
    failed = bool(row.get("error")) or row.get("obs_ok") is False
    return f'<div class="turn{" failed" if failed else ""}">' + "".join(parts) + "</div>"


def _cost(r: Record) -> str:
    usage, timings = r.usage or {}, r.timings or {}
    if not usage and not timings:
        return ""
    bits = []
    if usage:
        bits.append(f"{usage.get('requests', 0)} VLM requests, {usage.get('prompt_tokens', 0)}+"
                    f"{usage.get('completion_tokens', 0)} tokens, {usage.get('request_bytes', 0)} request bytes, "
                    f"{usage.get('images_sent', 0)} images sent, {usage.get('retries', 0)} retries")
    if timings:
        bits.append(", ".join(f"{e(k)} {_num(v, 2)}" for k, v in timings.items()))
    return f'<p class="muted">cost: {"; ".join(bits)}</p>'


# --------------------------------------------------------------------------------------- page

def render_report(records: Sequence[Record], *, run_dir: Path | None = None, page_dir: Path | None = None,
                  manifest_items: dict[str, Any] | None = None, embed_images: bool = True,
                  alpha: float = 0.5, summary: bool = True, title: str | None = None,
                  source: str = "records") -> str:
    """The HTML page for ``records`` (in the order given) as a string.

    ``run_dir`` is where the tool images named in the records live (``images/<item>/...``);
    ``page_dir`` is the folder the page will be written to (for linked images); ``manifest_items``
    maps item ids to :class:`~anomalyclaw.items.Item` to show query and references. With
    ``summary`` the page starts with the AUROC table and ROC/bar plots at fusion weight ``alpha``.
    """
    images = _Images(run_dir, page_dir or run_dir or Path.cwd(), embed_images)
    infos = _run_info(run_dir)
    title = title or "AnomalyClaw run" + (f" {infos[-1].get('run_id')}" if infos else "")
    used: set[str] = set()
    anchors = {r.item_id: _anchor(r.item_id, used) for r in records}
    single = len(records) == 1
    parts = [f"<h1>{e(title)}</h1>", _run_section(records, infos, source)]
    if summary:
        parts.append(_metrics_section(records, alpha))
    if not single:
        parts.append(_index_section(records, anchors))
    parts.append("<h2>Trajectories</h2>")
    manifest_items = manifest_items or {}
    parts += [_item_section(r, anchors[r.item_id], images, manifest_items.get(r.item_id), open_=single)
              for r in records]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="muted">Written by anomalyclaw report at {stamp}.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _sort_key(r: Record) -> tuple:
    """Domains in the order the AUROC table lists them (D2 before D10), then item ids."""
    return (*domain_order(r.domain_code or r.domain or "?"), r.item_id)


def build_report(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 item_ids: Sequence[str] | None = None, manifest: str | os.PathLike | None = None,
                 embed_images: bool = True, alpha: float = 0.5) -> Path:
    """Write the HTML report of the run at ``path`` and return the page's path.

    ``path``: a run folder (``records.jsonl`` and ``images/``), a records file, or a folder of
    released ``D*.json`` arrays. ``out`` defaults to ``<run folder>/report.html``. ``item_ids``
    limits the page to those items (no AUROC summary then). ``manifest``, the manifest that was
    run, adds each item's query and references with the candidates' boxes. ``embed_images=False``
    links the images instead of embedding them (a smaller page that must stay beside the run).
    """
    src = Path(path)
    records = load_records(src)
    if not records:
        raise AnomalyClawError(f"{src} holds no valid records: nothing to report")
    run_dir = src if src.is_dir() else src.parent
    if item_ids:
        item_ids = list(dict.fromkeys(item_ids))
        by_id = {r.item_id: r for r in records}
        missing = [i for i in item_ids if i not in by_id]
        if missing:
            some = ", ".join(sorted(by_id)[:5])
            raise AnomalyClawError(f"no record for item(s) {missing} in {src} ({len(records)} records, e.g. {some})")
        records = [by_id[i] for i in item_ids]
    else:
        records = sorted(records, key=_sort_key)
    manifest_items = None
    if manifest is not None:
        from anomalyclaw.eval.data.manifests import read_manifest

        manifest_items = {it.item_id: it for it in read_manifest(manifest).items}
    page = Path(out) if out is not None else run_dir / REPORT_FILE
    page.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(records, run_dir=run_dir, page_dir=page.parent, manifest_items=manifest_items,
                         embed_images=embed_images, alpha=alpha, summary=not item_ids, source=str(src))
    page.write_text(text, encoding="utf-8")
    return page
