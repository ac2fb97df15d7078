"""The HTML page of a run: AUROC summary and plots, where the anomalies are, then each item's
trajectory turn by turn.

Built from ``OUT/records.jsonl`` (or released ``D*.json`` arrays), the anomaly maps under
``OUT/maps`` and the tool images that ``anomalyclaw run --save-images`` wrote under
``OUT/images/<item>/``. The page is one self-contained file: no network, no JavaScript (a
Content-Security-Policy forbids scripts outright); images are embedded as small ``data:``
thumbnails (or linked, for large runs). The page is a Jinja2 template rendered with autoescape:
this module hands it plain strings and numbers, never markup, because model output, item ids,
domain cards and usage values are all untrusted. An image path from a record is used only when
it names an image file inside ``OUT/images`` (tool images) or ``OUT/maps`` (maps).

Each item with a manifest shows its query with the agent's anomaly map overlaid (coloured where
the map is above 0.5: more unusual than the worst normal reference), its confirmed boxes in red,
refuted ones in green, boxes still open in orange (dashed), the direct branch's box in blue and
the ground-truth mask's outline in yellow. Without ``ANOMALYCLAW_DATA`` (or with files gone) the
page still renders: missing images are marked, the map is shown on its own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.experts.maps import overlay_heatmap
from anomalyclaw.graph.localization import valid_bbox
from anomalyclaw.graph.localize import decode_map
from anomalyclaw.imaging import decode_image, encode_image, load_image, load_mask, resize_longest, to_data_url
from anomalyclaw.paths import safe_file_name, write_atomic

from anomalyclaw.eval.scoring.metrics import domain_order, evaluate
from anomalyclaw.eval.running.records import Record, load_records

REPORT_FILE = "report.html"
#: Longest side of the query overlay (pixels): enough to see a defect and its box.
THUMB_SIDE = 256
#: Longest side of reference thumbnails: they only show what normal looks like.
REF_THUMB_SIDE = 128
#: Longest side of embedded tool images (the saved panels are up to 768 px wide; the full file is
#: linked beside it).
TOOL_THUMB_SIDE = 512
#: JPEG quality of embedded thumbnails: 80 keeps edges readable at a third of the bytes of 95.
THUMB_QUALITY = 80
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_DATA_URL = re.compile(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+")
#: The map level shown in colour: above 0.5 the agent's map is more unusual than the worst
#: normal reference (log-odds above 0, see graph.localization).
OVERLAY_FROM = 0.5
#: Box colours (SVG strokes) and their legend words.
COLOURS = {"confirmed": "#e00", "refuted": "#0a0", "open": "#f90", "direct": "#06f", "candidate": "#e00"}
LEGEND = {"confirmed": "red: confirmed", "refuted": "green: refuted", "open": "orange: not decided",
          "direct": "blue: direct branch's bbox", "candidate": "red: candidates", "truth": "yellow: ground truth"}
#: Points of a ground-truth outline at most (bounds the page; the shape stays recognisable).
MAX_OUTLINE_POINTS = 400

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
details.item>summary{cursor:pointer;font-weight:600;word-break:break-all}
details.item.error{border-color:#c33;background:#fff6f6}
.turn{border-left:3px solid #88a;padding:.1em .8em;margin:.8em 0}
.turn.failed{border-left-color:#c33}
.muted{color:#666}.bad{color:#b00;font-weight:600}.warn{color:#a60}
.confirmed{color:#b00;font-weight:600}.refuted{color:#070;font-weight:600}.uncertain{color:#a60;font-weight:600}
.images{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}figcaption{font-size:12px;color:#555;max-width:360px;
 word-break:break-all}
.thumb{position:relative;display:inline-block;line-height:0}.thumb img{max-width:520px;border:1px solid #ddd}
.thumb svg{position:absolute;left:0;top:0;width:100%;height:100%}
.shared{display:inline-block;background-size:contain;background-repeat:no-repeat;border:1px solid #ddd}
.note{background:#fff8e1;border:1px solid #f0d890;padding:4px 8px;margin:.5em 0}
img.plot{max-width:100%;border:1px solid #eee}
td{word-break:break-word}
"""


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)
    return env.get_template("report.html.j2")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    """Any record value as display text (JSON for structures)."""
    return value if isinstance(value, str) else _json(value)


def _finite(value: Any) -> Any:
    """Numbers as they are (non-finite as NaN, shown "n/a"); anything else as text or None."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) or math.isfinite(value) else float("nan")
    return _text(value)


def anchor_for(item_id: str, used: set[str]) -> str:
    """A unique HTML id for an item: ``item-`` plus :func:`~anomalyclaw.paths.safe_file_name`
    (ids may hold any characters, any length; two ids never share an anchor)."""
    base = "item-" + safe_file_name(item_id)
    anchor, n = base, 1
    while anchor in used:
        n += 1
        anchor = f"{base}-{n}"
    used.add(anchor)
    return anchor


def _valid_bbox(value: Any) -> list[float] | None:
    """A normalized [x0, y0, x1, y1] box, or None when ``value`` is not one (released records
    hold pixel boxes and strings; those are shown as text, not drawn)."""
    box = valid_bbox(value)
    return None if box is None else list(box)


def _label(label: Any) -> str:
    return {1: "anomalous", 0: "normal", None: "–"}.get(label, str(label)) if label in (0, 1, None) else str(label)


# ------------------------------------------------------------------------------------- images

def _jpeg_url(image: np.ndarray, side: int) -> tuple[str, int, int]:
    small = resize_longest(image, side)
    return to_data_url(encode_image(small, "JPEG", quality=THUMB_QUALITY)), small.shape[1], small.shape[0]


def _outline(mask: np.ndarray) -> str:
    """An SVG path (normalized 0..1 coordinates) around a bool mask's regions."""
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    total = sum(len(c) for c in contours) or 1
    # Simplify harder when there is a lot of outline, so a noisy mask cannot bloat the page.
    epsilon = max(0.5, total / MAX_OUTLINE_POINTS)
    parts = []
    for c in contours:
        pts = cv2.approxPolyDP(c, epsilon, True).reshape(-1, 2)
        if len(pts) < 2:
            x, y = pts[0]
            pts = np.array([[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1]])
        coords = " L".join(f"{(x + 0.5) / w:.3f} {(y + 0.5) / h:.3f}" for x, y in pts)
        parts.append(f"M{coords} Z")
    return " ".join(parts)


def _figure(label: str = "", **fields: Any) -> dict[str, Any]:
    """One figure as the template reads it (every key present: the template is strict)."""
    out = {"label": label, "src": "", "width": None, "height": None, "boxes": [], "outline": "", "note": "",
           "missing": "", "full": "", "problem": "", "cls": "", "shared": ""}
    out.update(fields)
    return out


class _Images:
    """Turns files into figures: embedded ``data:`` thumbnails or links from the page."""

    def __init__(self, run_dir: Path | None, page_dir: Path, embed: bool):
        self.run_dir = run_dir.resolve() if run_dir is not None else None
        self.page_dir = page_dir.resolve()
        self.embed = embed
        self.missing = 0
        self.shared: dict[str, tuple[str, str, int, int]] = {}
        """Reference thumbnails by file: (CSS class, data URL, width, height). Items share
        references (a category's, a pool's), so each file is embedded once, in the page's style
        sheet, and every figure of it names its class."""

    def shared_css(self) -> str:
        """One rule per shared thumbnail (its data URL is base64: nothing in it can end the rule)."""
        return "".join(f".{cls}{{background-image:url({url});width:{w}px;height:{h}px}}"
                       for cls, url, w, h in self.shared.values())

    def _inside(self, rel: Any, folder: str, suffixes: Iterable[str]) -> tuple[Path | None, str | None]:
        """(path, problem): ``rel`` from a record, accepted only as a file under OUT/<folder>."""
        if self.run_dir is None:
            return None, f"{rel} (no run folder to read it from)"
        root = (self.run_dir / folder).resolve()
        path = (self.run_dir / str(rel)).resolve() if isinstance(rel, str) and rel else None
        if path is None or not path.is_relative_to(root) or path.suffix.lower() not in suffixes:
            return None, f"image path {_text(rel)} refused: not an image file under {root}"
        return path, None

    def tool_image(self, rel: Any) -> dict[str, Any]:
        """A figure for one saved tool image named in a record (relative to the run folder)."""
        path, problem = self._inside(rel, "images", IMAGE_SUFFIXES)
        if path is None:
            return _figure(problem=problem, cls="bad" if self.run_dir is not None else "muted")
        if not path.is_file():
            self.missing += 1
            return _figure(problem=f"image {rel} is missing from {self.run_dir}", cls="warn")
        if self.embed:
            try:
                src, w, h = _jpeg_url(decode_image(path.read_bytes()), TOOL_THUMB_SIDE)
            except Exception as exc:  # a corrupt file on disk: say so, keep the page
                return _figure(problem=f"image {rel} cannot be read ({type(exc).__name__})", cls="warn")
            return _figure(path.stem, src=src, width=w, height=h, full=self._link(path))
        return _figure(path.stem, src=self._link(path))

    def thumbnail(self, path: Path | None, label: str, side: int = REF_THUMB_SIDE) -> dict[str, Any]:
        """A manifest image (a reference) as a small thumbnail, or a figure marked missing."""
        figure = _figure(label)
        try:
            if path is None:
                raise FileNotFoundError("no path")
            if self.embed:
                key = str(Path(path).resolve())
                if key not in self.shared:
                    url, w, h = _jpeg_url(load_image(path, max_side=side), side)
                    if not _DATA_URL.fullmatch(url):
                        raise ValueError("unexpected data URL")  # never: to_data_url writes base64
                    self.shared[key] = (f"ref{len(self.shared)}", url, w, h)
                cls, _, w, h = self.shared[key]
                figure.update(shared=cls, width=w, height=h)
            elif Path(path).is_file():
                figure["src"] = self._link(Path(path))
            else:
                raise FileNotFoundError(path)
        except (AnomalyClawError, OSError) as exc:
            self.missing += 1
            figure["missing"] = f"cannot read {path} ({exc})"
        return figure

    def overlay(self, query_path: Path | None, map_rel: Any, mask_path: Path | None,
                boxes: list[dict[str, Any]]) -> dict[str, Any]:
        """The query with the agent's map overlaid, the boxes and the ground-truth outline."""
        figure = _figure("query", boxes=boxes)
        query = problem = None
        try:
            if query_path is None:
                raise FileNotFoundError("no manifest entry")
            query = load_image(query_path, max_side=THUMB_SIDE)
        except (AnomalyClawError, OSError) as exc:
            self.missing += 1
            problem = f"query image missing ({exc})"
        amap = None
        if map_rel is not None:
            path, _ = self._inside(map_rel, "maps", (".png",))
            if path is not None and path.is_file():
                try:
                    amap = decode_map(path.read_bytes())
                except (OSError, ValueError):  # not a greyscale PNG: shown as no map
                    amap = None
        notes = []
        if query is not None and amap is not None:
            heat = np.clip((cv2.resize(amap, (query.shape[1], query.shape[0])) - OVERLAY_FROM) / (1 - OVERLAY_FROM),
                           0, 1)
            image = overlay_heatmap(query, heat, 0.6, proportional=True)
            notes.append("agent's map overlaid")
        elif amap is not None:
            small = resize_longest(amap, THUMB_SIDE)
            heat = np.clip((small - OVERLAY_FROM) / (1 - OVERLAY_FROM), 0, 1)
            image = overlay_heatmap(np.full((*small.shape, 3), 96, np.uint8), heat, 1.0)
            notes.append(f"agent's map alone: {problem}")
            problem = None
        elif query is not None:
            image = query
            notes.append("no anomaly map" if map_rel is None else f"anomaly map {_text(map_rel)} is missing")
        else:
            figure["missing"] = problem or "no image"
            return figure
        figure["src"], figure["width"], figure["height"] = _jpeg_url(image, THUMB_SIDE)
        figure["note"] = "; ".join(notes)
        if mask_path is not None:
            try:
                figure["outline"] = _outline(load_mask(mask_path, (image.shape[0], image.shape[1])))
            except (AnomalyClawError, OSError):
                self.missing += 1
                figure["note"] += "; ground-truth mask missing"
        return figure

    def _link(self, path: Path) -> str:
        try:
            return Path(os.path.relpath(path, self.page_dir)).as_posix()
        except ValueError:  # another drive (Windows): only an absolute URI reaches it
            return path.as_uri()


# ------------------------------------------------------------------------------------ summary

def _run_info(run_dir: Path | None) -> list[dict[str, Any]]:
    """The ``run_*.json`` files the runner wrote (one per start or resume), oldest first."""
    if run_dir is None or not run_dir.is_dir():
        return []
    infos = []
    for p in sorted(run_dir.glob("run_*.json")):
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(info, dict):
            infos.append(info)
    return infos


def _run_rows(records: Sequence[Record], infos: list[dict[str, Any]], source: str) -> list[tuple[str, str]]:
    backends = sorted({f"{r.backend} ({r.model})" for r in records if r.backend})
    rows = [("records", f"{len(records)} from {source}"), ("errors", str(sum(1 for r in records if r.error))),
            ("backend", ", ".join(backends) or "–")]
    if infos:
        last = infos[-1]
        rows += [("run", f"{last.get('run_id')} (started {last.get('started_at')})"
                  + (f"; {len(infos)} starts (resumed)" if len(infos) > 1 else "")),
                 ("prompts", _text(last.get("prompts"))),
                 ("tools", ", ".join(map(str, last.get("tools") or [])) if isinstance(last.get("tools"), list)
                  else _text(last.get("tools"))),
                 ("config", _json(last.get("config")))]
    return rows


def _metrics(records: Sequence[Record], alpha: float) -> dict[str, Any]:
    result = evaluate(records, alpha=alpha)  # fused at the records' own expert weight
    weight = result["expert_weight"]
    cols = list(result["macro_auroc"])
    fused = (f"fused = the blend with the expert term at weight {weight:g}" if weight
             else "fused = the blend (no expert term)")
    out = {"kept": result["kept"], "n_rows": result["rows"], "left_out": result["rows"] - result["kept"],
           "cols": cols, "alpha_text": f"{alpha:g} × direct + {1 - alpha:g} × refute; {fused}",
           "rows": [{"code": code, "n": d["n"], "n_anomalous": d["n_anomalous"], "cells": [d[c] for c in cols]}
                    for code, d in result["per_domain"].items()],
           "macro": [result["macro_auroc"][c] for c in cols], "plots": []}
    # A plot with no domain holding both classes would be empty axes.
    if result["kept"] and any(math.isfinite(v) for v in result["macro_auroc"].values()):
        out["plots"] = _plots(records, result, alpha, weight)
    return out


def _plots(records: Sequence[Record], result: dict, alpha: float, weight: float = 0.0) -> list[dict[str, str]]:
    from anomalyclaw.eval.reports.plots import plot_domain_bars, plot_roc_curves  # matplotlib only when a page has plots

    with tempfile.TemporaryDirectory(prefix="anomalyclaw-report-") as tmp:
        roc = plot_roc_curves(records, Path(tmp) / "roc_curves.png", alpha=alpha, expert_weight=weight)
        bars = plot_domain_bars(result, Path(tmp) / "domain_auroc.png")
        return [{"title": "ROC curves", "src": to_data_url(roc.read_bytes())},
                {"title": "AUROC by domain", "src": to_data_url(bars.read_bytes())}]


def _decision(records: Sequence[Record]) -> dict[str, Any] | None:
    """F1 and friends at the threshold the run recorded (``run --threshold``), when every
    judged record carries the same one."""
    from anomalyclaw.eval.scoring.thresholds import decision_metrics

    thresholds = {r.threshold for r in records if not r.error and r.threshold is not None}
    if len(thresholds) != 1:
        return None
    out = decision_metrics(records, thresholds.pop())
    return out if out["per_domain"] else None


def _pixel(records: Sequence[Record], items: dict[str, Any], run_dir: Path | None) -> dict[str, Any] | None:
    from anomalyclaw.eval.scoring.pixels import evaluate_pixels

    if run_dir is None or not items or not any(r.localization and r.localization.get("map") for r in records):
        return None
    if not any(getattr(items.get(r.item_id), "mask_path", None) for r in records):
        return None
    out = evaluate_pixels(records, items, run_dir)
    return out if any(d["n_items"] for d in out["per_domain"].values()) else None


# -------------------------------------------------------------------------------------- items

def _box(bbox: list[float], kind: str, title: str, dashed: bool = False) -> dict[str, Any]:
    x0, y0, x1, y1 = bbox
    return {"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "colour": COLOURS[kind], "title": title,
            "dashed": dashed, "kind": kind}


def _boxes(r: Record) -> tuple[list[dict[str, Any]], list[str]]:
    """The boxes to draw over the query, and one line of text listing them."""
    boxes, lines = [], []
    loc = r.localization if isinstance(r.localization, dict) else None
    if loc is not None:
        for b in loc.get("boxes") or []:
            if isinstance(b, dict) and (bb := _valid_bbox(b.get("bbox"))):
                boxes.append(_box(bb, "confirmed", f"confirmed {_text(b.get('candidate'))} by {_text(b.get('tool'))}"
                                  f" (score {_text(b.get('score'))})"))
                lines.append(f"confirmed {_text(b.get('candidate'))} {_json(bb)} score {_text(b.get('score'))}")
        for b in loc.get("refuted") or []:
            if isinstance(b, dict) and (bb := _valid_bbox(b.get("bbox"))):
                boxes.append(_box(bb, "refuted", f"refuted {_text(b.get('candidate'))} by {_text(b.get('tool'))}"))
                lines.append(f"refuted {_text(b.get('candidate'))} {_json(bb)}")
        for c in r.remaining_features:
            if isinstance(c, dict) and c.get("status") in ("open", "uncertain") and (bb := _valid_bbox(c.get("bbox"))):
                boxes.append(_box(bb, "open", f"{_text(c.get('status'))} {_text(c.get('id'))}: "
                                  f"{_text(c.get('description'))}", dashed=True))
    else:
        for c in r.candidate_features:
            if isinstance(c, dict) and (bb := _valid_bbox(c.get("bbox"))):
                boxes.append(_box(bb, "candidate", f"candidate {_text(c.get('id'))}: {_text(c.get('description'))}"))
    direct = _direct_reply(r)
    dbox = _valid_bbox(direct.get("bbox")) if isinstance(direct, dict) else None
    if dbox:
        boxes.append(_box(dbox, "direct", f"direct branch: {_text(direct.get('evidence') or '')}"))
    return boxes, lines


def draw_localization(record: Record, *, run_dir: str | os.PathLike, query_path: str | os.PathLike | None = None,
                      mask_path: str | os.PathLike | None = None, side: int = 384) -> np.ndarray:
    """One item's localization as a picture (H x W x 3 uint8 RGB), the layers of the report's
    figure: the query (grey when ``query_path`` is None) with the agent's map coloured where it
    is above :data:`OVERLAY_FROM`, the boxes (confirmed red, refuted green, undecided thin orange,
    the direct branch's blue) and the ground-truth mask's outline in yellow. ``run_dir`` is the run
    folder that holds ``OUT/maps``; a map path outside it is refused."""
    run_dir = Path(run_dir)
    loc = record.localization if isinstance(record.localization, dict) else {}
    amap = None
    if isinstance(loc.get("map"), str):
        path = (run_dir / loc["map"]).resolve()
        if not path.is_relative_to((run_dir / "maps").resolve()):
            raise ValueError(f"map path {loc['map']!r} of {record.item_id!r} is not under {run_dir / 'maps'}")
        try:
            amap = decode_map(path.read_bytes())
        except (OSError, ValueError):
            raise AnomalyClawError(f"{path}: not a greyscale PNG map") from None
    if query_path is not None:
        image = load_image(query_path, max_side=side)
    else:
        shape = amap.shape if amap is not None else (side, side)
        image = resize_longest(np.full((*shape, 3), 96, np.uint8), side)
    h, w = image.shape[:2]
    if amap is not None:
        heat = np.clip((cv2.resize(amap, (w, h)) - OVERLAY_FROM) / (1 - OVERLAY_FROM), 0, 1)
        image = overlay_heatmap(image, heat, 0.6, proportional=True)
    else:
        image = image.copy()
    thickness = max(1, round(max(h, w) / 200))
    if mask_path is not None:
        contours, _ = cv2.findContours(load_mask(mask_path, (h, w)).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (250, 210, 40), thickness)
    for box in _boxes(record)[0]:
        rgb = tuple(int(box["colour"][1 + k], 16) * 17 for k in range(3))  # "#e00" -> (238, 0, 0)
        x0, y0 = round(box["x"] * w), round(box["y"] * h)
        x1, y1 = round((box["x"] + box["w"]) * w) - 1, round((box["y"] + box["h"]) * h) - 1
        # OpenCV draws no dashes: the report's dashed (undecided) boxes are thin lines here.
        cv2.rectangle(image, (x0, y0), (max(x0, x1), max(y0, y1)), rgb, 1 if box["dashed"] else thickness)
    return image


def _direct_reply(r: Record) -> Any:
    if not r.direct_rationale:
        return None
    try:
        return json.loads(r.direct_rationale)
    except (json.JSONDecodeError, TypeError):
        return r.direct_rationale


def _direct(r: Record) -> dict[str, Any] | None:
    reply = _direct_reply(r)
    if reply is None:
        return None
    if not isinstance(reply, dict):
        return {"raw": _text(reply)}
    return {"raw": None, "label": _text(reply.get("image_label")), "confidence": _finite(reply.get("confidence")),
            "anomaly_type": _text(reply["anomaly_type"]) if reply.get("anomaly_type") else "",
            "bbox": _json(reply.get("bbox")) if reply.get("bbox") is not None else "",
            "evidence": _text(reply["evidence"]) if reply.get("evidence") else ""}


def _candidates(candidates: Iterable[Any]) -> list[dict[str, Any]]:
    rows = []
    for k, c in enumerate(candidates):
        if not isinstance(c, dict):
            rows.append({"raw": _text(c), "index": k})
            continue
        # Released records name candidates ("name", "location_hint") instead of id/description/bbox.
        where = c.get("bbox") if c.get("bbox") is not None else c.get("location_hint")
        rows.append({"raw": None, "id": _text(c.get("id", k)), "what": _text(c.get("description") or c.get("name") or ""),
                     "where": _json(where) if where is not None else "–",
                     "status": _text(c["status"]) if c.get("status") else "",
                     "looks": _text(c["looks_defect_like"]) if c.get("looks_defect_like") else ""})
    return rows


def _action(action: Any) -> str:
    if isinstance(action, dict):
        if action.get("commit"):
            return "commit"
        return f"call {_text(action.get('tool'))} {_json(action.get('args') or {})}" + (
            f" on {_text(action.get('candidate'))}" if action.get("candidate") else "")
    return _text(action) if action else ""


def _turn(row: Any, images: _Images) -> dict[str, Any]:
    if not isinstance(row, dict):
        return {"raw": _text(row)}
    score = row.get("anomaly_score", row.get("updated_score"))
    evidence = row.get("visual_evidence")
    candidates = row.get("candidates", row.get("remaining_candidate_features"))
    verdicts = row.get("verdicts")
    saved = row.get("images")
    target = row.get("candidate", row.get("refutation_target"))
    args = row.get("args")
    return {
        "raw": None, "turn": _text(row.get("turn", "?")), "stage": _text(row.get("stage") or ""),
        # Released rows carry the run's "mode" instead of a stage: it says nothing about the turn.
        "score": _finite(score), "confidence": _finite(row.get("confidence")), "forced": bool(row.get("forced")),
        "why": _text(row.get("rationale") or row.get("thought") or ""),
        "evidence": [_text(v) for v in evidence] if isinstance(evidence, list) else [],
        "candidates": _candidates(candidates) if isinstance(candidates, list) else [],
        "tool": _text(row["tool"]) if row.get("tool") else "",
        "args": args if isinstance(args, str) else _json(args),
        "target": None if target is None else _text(target),
        "observation": _text(row.get("observation")) if "observation" in row else None,
        "obs_failed": row.get("obs_ok") is False, "obs_error": _text(row["obs_error"]) if row.get("obs_error") else "",
        "obs_data": _json(row["obs_data"]) if isinstance(row.get("obs_data"), dict) and row["obs_data"] else "",
        "images": [images.tool_image(p) for p in saved] if isinstance(saved, list) else [],
        "verdicts": [({"raw": None, "id": _text(v.get("id")), "status": _text(v.get("status")),
                       "evidence": _text(v.get("evidence"))} if isinstance(v, dict) else {"raw": _text(v)})
                     for v in verdicts] if isinstance(verdicts, list) else [],
        "verdict": _text(row["refutation_verdict"]) if row.get("refutation_verdict") else "",
        "verdict_update": _text(row.get("feature_status_update")),
        "action": _action(row.get("action")), "error": _text(row["error"]) if row.get("error") else "",
        "reply": _text(row["reply"]) if row.get("reply") else "",
        "other": [(_text(k), _text(v)) for k, v in row.items() if k not in _TURN_KEYS],
        "failed": bool(row.get("error")) or row.get("obs_ok") is False,
    }


def _cost(r: Record) -> str:
    usage = r.usage if isinstance(r.usage, dict) else {}
    timings = r.timings if isinstance(r.timings, dict) else {}
    bits = []
    if usage:
        u = {k: _text(usage.get(k, 0)) for k in ("requests", "prompt_tokens", "completion_tokens", "request_bytes",
                                                  "images_sent", "retries")}
        bits.append(f"{u['requests']} VLM requests, {u['prompt_tokens']}+{u['completion_tokens']} tokens, "
                    f"{u['request_bytes']} request bytes, {u['images_sent']} images sent, {u['retries']} retries")
    if timings:
        bits.append(", ".join(f"{_text(k)} {v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v) else f"{_text(k)} {_text(v)}" for k, v in timings.items()))
    return "; ".join(bits)


def _card(item: Any) -> list[tuple[str, str]]:
    card = getattr(item, "card", None)
    if card is None:
        return []
    return [("name", _text(card.name)), ("normal", _text(card.normal)), ("anomalous", _text(card.anomaly)),
            ("traits", ", ".join(sorted(map(str, card.traits))))]


def _item(r: Record, anchor: str, images: _Images, item: Any, *, open_: bool) -> dict[str, Any]:
    boxes, box_lines = _boxes(r)
    loc = r.localization if isinstance(r.localization, dict) else {}
    figures = []
    if item is not None:
        figures.append(images.overlay(item.query_path, loc.get("map"), item.mask_path, boxes))
        figures += [images.thumbnail(p, f"reference {k + 1}") for k, p in enumerate(item.ref_paths)]
    elif loc.get("map"):
        figures.append(images.overlay(None, loc.get("map"), None, boxes))
    kinds = {b["kind"] for b in boxes}
    legend = [LEGEND[k] for k in ("confirmed", "refuted", "open", "candidate", "direct") if k in kinds]
    if figures and figures[0].get("outline"):
        legend.append(LEGEND["truth"])
    truth = f"ground truth: {_label(r.label_gt)}" + (f" ({_text(r.anomaly_type_gt)})" if r.anomaly_type_gt else "")
    weights = (f"weights: direct {_text(_fmt(r.w_direct))}, refute {_text(_fmt(r.w_v9))}, "
               f"expert {_text(_fmt(r.w_expert))}")
    extra = " · ".join(x for x in (truth, weights, f"category {_text(r.category)}" if r.category else "",
                                   f"confidence {_fmt(r.confidence)}" if r.confidence is not None else "",
                                   f"called {_label(r.label_pred)} at threshold {_fmt(r.threshold, 4)}"
                                   if r.label_pred is not None else "") if x)
    return {
        "anchor": anchor, "item_id": r.item_id, "domain": _text(r.domain_code or r.domain or "?"),
        "label": _label(r.label_gt), "fused": _finite(r.anomaly_score), "error": bool(r.error), "open": open_,
        "scores": [("fused", _finite(r.anomaly_score)), ("direct", _finite(r.direct_score)),
                   ("refute", _finite(r.refute_score)), ("expert", _finite(r.expert_score)),
                   ("initial", _finite(r.v9_initial_score)), ("last update", _finite(r.v9_updated_score))],
        "extra": extra,
        "errors": [(name, _text(v)) for name, v in (("error", r.error), ("direct branch error", r.direct_error),
                                                     ("refutation branch error", r.refute_error)) if v],
        "fallback_list": [_text(f) for f in r.fallbacks], "card": _card(item),
        "figures": figures, "legend": legend, "boxes_text": "; ".join(box_lines),
        "direct": _direct(r), "fused_direct": _finite(r.direct_score),
        "turns": [_turn(row, images) for row in r.history],
        "rationale": _text(r.rationale) if r.rationale else "", "cost": _cost(r),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "–" if value is None else _text(value)


def _index(records: Sequence[Record], anchors: dict[str, str]) -> list[dict[str, Any]]:
    return [{"anchor": anchors[r.item_id], "item_id": r.item_id, "domain": _text(r.domain_code or r.domain or "?"),
             "label": _label(r.label_gt), "fused": _finite(r.anomaly_score), "direct": _finite(r.direct_score),
             "refute": _finite(r.refute_score), "called": _label(r.label_pred) if r.label_pred is not None else "",
             "turns": r.n_turns, "tools": ", ".join(map(_text, r.tools_used)), "error": bool(r.error),
             "fallbacks": len(r.fallbacks)} for r in records]


# --------------------------------------------------------------------------------------- page

def render_report(records: Sequence[Record], *, run_dir: Path | None = None, page_dir: Path | None = None,
                  manifest_items: dict[str, Any] | None = None, embed_images: bool = True,
                  alpha: float = 0.5, summary: bool = True, title: str | None = None,
                  source: str = "records", notes: Sequence[str] = ()) -> str:
    """The HTML page for ``records`` (in the order given) as a string.

    ``run_dir`` is where the maps and tool images named in the records live (``maps/``,
    ``images/<item>/...``); ``page_dir`` is the folder the page will be written to (for linked
    images); ``manifest_items`` maps item ids to :class:`~anomalyclaw.items.Item` to show the
    query (with the map, boxes and mask outline) and the references. With ``summary`` the page
    starts with the AUROC table and ROC/bar plots at fusion weight ``alpha``, the decision at the
    recorded threshold and the pixel metrics when masks exist. ``notes`` are shown at the top.
    """
    images = _Images(run_dir, page_dir or run_dir or Path.cwd(), embed_images)
    infos = _run_info(run_dir)
    title = title or "AnomalyClaw run" + (f" {_text(infos[-1].get('run_id'))}" if infos else "")
    used: set[str] = set()
    anchors = {r.item_id: anchor_for(r.item_id, used) for r in records}
    single = len(records) == 1
    manifest_items = manifest_items or {}
    metrics = _metrics(records, alpha) if summary else None
    if metrics is not None:
        metrics["decision"] = _decision(records)
        metrics["pixel"] = _pixel(records, manifest_items, run_dir)
    items = [_item(r, anchors[r.item_id], images, manifest_items.get(r.item_id), open_=single) for r in records]
    page_notes = list(notes)
    if images.missing:
        page_notes.append(f"{images.missing} image(s) could not be read and are marked missing below.")
    return _template().render(
        title=title, css=_CSS + images.shared_css(), offline=any(r.backend == "offline" for r in records), notes=page_notes,
        run_rows=_run_rows(records, infos, source), metrics=metrics,
        decision=metrics["decision"] if metrics else None, pixel=metrics["pixel"] if metrics else None,
        index=None if single else _index(records, anchors), items=items,
        stamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _sort_key(r: Record) -> tuple:
    """Domains in the order the AUROC table lists them (D2 before D10), then item ids."""
    return (*domain_order(r.domain_code or r.domain or "?"), r.item_id)


def _manifest_items(manifest: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """The manifest's items by id, and notes for the page. Without a usable ``ANOMALYCLAW_DATA``
    (unset, or not a folder) a ``{DATA_ROOT}`` manifest still loads: its paths are read against
    an empty folder removed right after and shown as ``{DATA_ROOT}/...``, so those images are
    marked missing instead of stopping the report."""
    from anomalyclaw.eval.data.manifests import data_root_from_env, read_manifest

    root = data_root_from_env()
    if root is not None and Path(root).is_dir():
        return {it.item_id: it for it in read_manifest(manifest).items}, []
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-no-data-root-") as empty:
        contents = read_manifest(manifest, data_root=empty)
        base = Path(empty).resolve()

    def shown(path: Path | None) -> Path | None:
        if path is None or not Path(path).is_relative_to(base):
            return path
        return Path("{DATA_ROOT}") / Path(path).relative_to(base)

    items = {it.item_id: dataclasses.replace(it, query_path=shown(it.query_path), mask_path=shown(it.mask_path),
                                             ref_paths=tuple(shown(p) for p in it.ref_paths))
             for it in contents.items}
    why = "is not set" if root is None else f"is {root}, which is not a folder"
    note = (f"ANOMALYCLAW_DATA {why}: images the manifest places under {{DATA_ROOT}} are marked missing. "
            "Set it to the data folder to see them.")
    return items, [note]


def build_report(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 item_ids: Sequence[str] | None = None, manifest: str | os.PathLike | None = None,
                 embed_images: bool = True, alpha: float = 0.5) -> Path:
    """Write the HTML report of the run at ``path`` and return the page's path.

    ``path``: a run folder (``records.jsonl``, ``maps/`` and ``images/``), a records file, or a
    folder of released ``D*.json`` arrays. ``out`` defaults to ``<run folder>/report.html``.
    ``item_ids`` limits the page to those items (no AUROC summary then). ``manifest``, the
    manifest that was run, adds each item's query with its map, boxes and mask outline, and its
    references. ``embed_images=False`` links the tool images and references instead of
    embedding thumbnails (a smaller page that must stay beside the run).
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
    manifest_items, notes = _manifest_items(manifest) if manifest is not None else (None, [])
    page = Path(out) if out is not None else run_dir / REPORT_FILE
    page.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(records, run_dir=run_dir, page_dir=page.parent, manifest_items=manifest_items,
                         embed_images=embed_images, alpha=alpha, summary=not item_ids, source=str(src), notes=notes)
    return write_atomic(page, text)
