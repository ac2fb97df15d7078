"""Judge images with no manifest: a query (or a folder of queries) against reference images.

What ``anomalyclaw predict QUERY --refs DIR`` runs: each query becomes an :class:`Item` with the
given references (a query that is also among the references is left out of its own set) and a
domain card (a file, or the generic card with chosen traits), the items go through the
:class:`~anomalyclaw.eval.running.runner.Runner` like any run (records, tool images), and each
record is summarised as the score, the verdicts, the boxes and where the images went.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from anomalyclaw.domains import GENERIC_CARD, TRAITS, DomainCard
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.items import Item

from anomalyclaw.eval.running.records import Record

#: File endings taken as images when a folder is given (any letter case).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: A fused score at or above this reads "anomalous" in the summary (the scores are in [0, 1]).
THRESHOLD = 0.5
#: What ``fingerprint.json`` names a predict folder by (so a predict never replaces a run's records).
KIND = "predict"


class PredictInputError(AnomalyClawError):
    """A query or reference path that cannot be used; the message names it."""


def image_files(paths: Iterable[str | os.PathLike], what: str) -> list[Path]:
    """The image files named by ``paths``: files as given, folders as the images directly in
    them (sorted by name, hidden files skipped)."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                            and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise PredictInputError(f"{what} folder {p} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend(f.resolve() for f in inside)
        elif p.is_file():
            found.append(p.resolve())
        else:
            raise PredictInputError(f"{what} {p} does not exist")
    return list(dict.fromkeys(found))


def domain_card(card: str | os.PathLike | None = None, traits: Sequence[str] | None = None) -> DomainCard:
    """The card for predict: a JSON file or inline JSON object (``DomainCard.from_json``), else
    the generic card; ``traits`` replace the card's traits."""
    if card is None:
        base = GENERIC_CARD
    else:
        text = str(card)
        try:
            data = json.loads(text) if text.lstrip().startswith("{") else \
                json.loads(Path(text).expanduser().read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PredictInputError(f"--domain-card {text}: no such file (pass a JSON file or a JSON object)") from None
        except (OSError, ValueError) as exc:
            raise PredictInputError(f"--domain-card {text}: not a JSON object ({exc})") from None
        if not isinstance(data, dict):
            raise PredictInputError(f"--domain-card {text}: expected a JSON object with 'code' and 'name'")
        try:
            base = DomainCard.from_json(data)
        except (TypeError, ValueError) as exc:
            raise PredictInputError(f"--domain-card {text}: {exc}") from None
    if traits is None:
        return base
    bad = sorted(set(traits) - set(TRAITS))
    if bad:
        raise PredictInputError(f"unknown trait(s) {', '.join(bad)}; known: {', '.join(sorted(TRAITS))}")
    return DomainCard(**{**base.__dict__, "traits": frozenset(traits)})


def predict_items(queries: Sequence[str | os.PathLike], refs: Sequence[str | os.PathLike],
                  card: DomainCard | None = None) -> list[Item]:
    """One item per query image, each with every reference image except itself."""
    query_files = image_files(queries, "query")
    ref_files = image_files(refs, "reference")
    card = card or GENERIC_CARD
    items, ids = [], set()
    for q in query_files:
        own_refs = tuple(r for r in ref_files if r != q)
        if not own_refs:
            raise PredictInputError(f"query {q} has no reference image besides itself: pass normal images with --refs")
        item_id, n = q.stem, 1
        while item_id in ids:  # a.png next to a.jpg, or the same name in two folders
            n += 1
            item_id = f"{q.stem}_{n}"
        ids.add(item_id)
        items.append(Item(item_id=item_id, query_path=q, ref_paths=own_refs, domain=card.name,
                          domain_code=card.code, card=card))
    return items


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def boxes(record: Record) -> list[dict[str, Any]]:
    """Every box the run produced: the candidates' and the regions each tool found."""
    out = [{"source": f"candidate {c.get('id')}", "bbox": c["bbox"], "status": c.get("status")}
           for c in record.remaining_features or record.candidate_features if c.get("bbox")]
    for h in record.history:
        data = h.get("obs_data") or {}
        for region in data.get("regions") or []:
            if region.get("bbox"):
                out.append({"source": f"{h.get('tool')} (turn {h.get('turn')})", "bbox": region["bbox"],
                            "peak": region.get("peak")})
    return out


def prediction(record: Record, item: Item, out_dir: Path) -> dict[str, Any]:
    """One query's result as plain data (what ``predict --json`` prints per query)."""
    images = [str(out_dir / p) for h in record.history for p in h.get("images", [])]
    score = record.anomaly_score
    extra = record.model_extra or {}
    maps = [str(out_dir / v) if not Path(str(v)).is_absolute() else str(v)
            for k, v in extra.items() if k.endswith("map_path") and v]
    loc = record.localization or {}
    if loc.get("map"):  # the agent's anomaly map (OUT/maps/<safe id>.png)
        maps.insert(0, str(out_dir / loc["map"]))
    return {"query": str(item.query_path), "item_id": record.item_id, "anomaly_score": score,
            "label": None if score is None else ("anomalous" if score >= THRESHOLD else "normal"),
            "threshold": THRESHOLD, "direct_score": record.direct_score, "refute_score": record.refute_score,
            "expert_score": record.expert_score, "error": record.error,
            "verdicts": [{k: v.get(k) for k in ("id", "status", "evidence", "tool")} for v in record.refutation_verdicts],
            "boxes": boxes(record), "tools_used": list(record.tools_used), "images": images, "maps": maps,
            "n_references": len(item.ref_paths)}


def format_prediction(pred: dict[str, Any]) -> str:
    """A few lines per query: score and label, branch scores, verdicts, boxes, image files."""
    name = Path(pred["query"]).name
    if pred["error"]:
        return f"{name}: no score: {pred['error']}"
    lines = [f"{name}: anomaly score {_fmt(pred['anomaly_score'])} -> {pred['label']} (threshold {THRESHOLD}; "
             f"direct {_fmt(pred['direct_score'])}, refute {_fmt(pred['refute_score'])}, expert "
             f"{_fmt(pred['expert_score'])}; {pred['n_references']} references)"]
    for v in pred["verdicts"]:
        lines.append(f"  verdict {v['id']}: {v['status']} - {v['evidence']}")
    for b in pred["boxes"]:
        lines.append(f"  box {b['bbox']} from {b['source']}" + (f" ({b['status']})" if b.get("status") else ""))
    if not pred["boxes"]:
        lines.append("  no box: no candidate or tool located a region")
    lines.append(f"  tools: {', '.join(pred['tools_used']) or 'none'}")
    for m in pred["maps"]:
        lines.append(f"  anomaly map: {m}")
    if pred["images"]:
        lines.append(f"  tool images ({len(pred['images'])}): {Path(pred['images'][0]).parent}/")
    return "\n".join(lines)
