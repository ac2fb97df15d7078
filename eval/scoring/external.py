"""External per-item expert scores for ``eval --expert-scores``: readers and the label-free
normalisation that turns them into the fusion's expert term.

A source is any file or folder of per-item rows with a string ``item_id``:

* the released baselines (``baselines/anomalydino/D*.json``: ``anomaly_score``),
* the released expert caches (``expert_cache/anomalyvfm_test.json``, ``subspacead_test.json``:
  ``anomaly_score``; their ids are an older revision of the benchmark's, so how many match is
  reported and most matches are other images: see the README),
* another run's records (a run folder or ``records.jsonl``: its ``expert_score``).

The score field is ``expert_score`` when the rows are run records (they carry ``direct_score``,
``v9_score`` or ``refute_score``), else ``anomaly_score``. Every row is accounted for: rows with
no string id, scores in no accepted form, rows with an ``error`` and duplicate ids are counted.

Normalisation is per domain and label-free, over the evaluated items of that domain that have
the score: a z-score (population standard deviation; a constant score gives 0) or, with
``norm="rank"``, the z-score of the average ranks (robust to outliers and to the score's
scale). It is transductive: an item's value depends on the other items evaluated with it.
Several sources form an ensemble: each is normalised, the available ones are averaged per item,
and the mean is the ``z`` of the fusion (``anomalyclaw.scores``), given to it as ``logistic(z)``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import rankdata

from anomalyclaw.scores import logistic

from anomalyclaw.eval.running.records import Record, iter_rows, show_value, parse_score, record_files

NORMS = ("z", "rank")
MISSING = ("drop", "blend")
RUN_FIELDS = ("direct_score", "v9_score", "refute_score")


@dataclass
class ExpertSource:
    """One ``--expert-scores`` source as read: ``scores[item_id]`` (raw, higher = more
    anomalous), which field was read, and every row that gave no score, counted."""

    path: Path
    score_field: str = "anomaly_score"
    scores: dict[str, float] = field(default_factory=dict)
    files: list[tuple[Path, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[tuple[str, Any]] = field(default_factory=list)
    no_score: int = 0
    errors: int = 0
    duplicates: int = 0

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.files)

    @property
    def name(self) -> str:
        return self.path.name

    def messages(self) -> list[str]:
        out = []
        if self.unreadable:
            out.append(f"{self.path}: {len(self.unreadable)} unreadable rows (first: {': '.join(self.unreadable[0])})")
        if self.invalid:
            where, value = self.invalid[0]
            out.append(f"{self.path}: {len(self.invalid)} values of '{self.score_field}' not accepted (first: {where}: "
                       f"{show_value(value)}); accepted: finite numbers or numeric strings")
        if self.errors:
            out.append(f"{self.path}: {self.errors} rows with an error left out")
        if self.duplicates:
            out.append(f"{self.path}: {self.duplicates} rows repeat an item id (the last one read is used)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "field": self.score_field, "rows": self.rows, "scores": len(self.scores),
                "unreadable": len(self.unreadable), "invalid_values": len(self.invalid),
                "no_score": self.no_score, "errors": self.errors, "duplicates": self.duplicates}


def read_expert_scores(path: str | os.PathLike) -> ExpertSource:
    """Read one source (a file, or a folder as :func:`record_files` reads it). Raises
    ValueError when nothing in it is a score, naming the file and the field looked for."""
    source = ExpertSource(path=Path(path))
    fields_seen: set[str] = set()
    for f in record_files(path):
        try:
            rows = list(iter_rows(f))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{f}: {exc}") from None
        source.files.append((f, len(rows)))
        for where, obj, problem in rows:
            if problem or not isinstance(obj.get("item_id"), str) or not obj["item_id"].strip():
                source.unreadable.append((where, problem or f"no string item_id (got {show_value(obj.get('item_id'))})"))
                continue
            name = "expert_score" if any(k in obj for k in RUN_FIELDS) else "anomaly_score"
            fields_seen.add(name)
            if obj.get("error"):
                source.errors += 1
                continue
            if obj.get(name) is None:
                source.no_score += 1
                continue
            try:
                score = parse_score(obj[name])
            except ValueError:
                source.invalid.append((where, obj[name]))
                continue
            if obj["item_id"] in source.scores:
                source.duplicates += 1
            source.scores[obj["item_id"]] = score
    if len(fields_seen) > 1:
        raise ValueError(f"{path} mixes run records (expert_score) and score rows (anomaly_score); give them "
                         "as separate --expert-scores")
    source.score_field = fields_seen.pop() if fields_seen else "anomaly_score"
    if not source.scores:
        raise ValueError(f"{path}: no row has a usable '{source.score_field}' ({source.rows} rows read"
                         + (f"; {'; '.join(source.messages())}" if source.messages() else "") + ")")
    return source


def domain_of(r: Record) -> str:
    return r.domain_code or r.domain or "?"


def normalise(scores: dict[str, float], domains: dict[str, str], norm: str = "z") -> dict[str, float]:
    """Per-domain label-free normalisation of ``scores`` (the ids given) to z-like values."""
    if norm not in NORMS:
        raise ValueError(f"unknown expert normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    groups: dict[str, list[str]] = defaultdict(list)
    for item_id in scores:
        groups[domains[item_id]].append(item_id)
    out: dict[str, float] = {}
    for ids in groups.values():
        x = np.array([scores[i] for i in ids], dtype=float)
        if norm == "rank":
            x = rankdata(x)
        sd = float(x.std())
        z = (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
        out.update(zip(ids, (float(v) for v in z)))
    return out


@dataclass
class ExpertJoin:
    """The expert term joined onto a run's records.

    ``units[item_id]`` is ``logistic`` of the mean normalised score of the sources that cover
    the item (with ``missing="drop"`` only items every source covers have one, so evaluation
    with ``require_expert`` scores those only); ``covered`` the kept items every source covers.
    """

    sources: list[ExpertSource]
    norm: str
    missing: str
    units: dict[str, float]
    covered: set[str]
    total: int
    matched: list[int]

    @property
    def require_expert(self) -> bool:
        """Whether evaluation scores only the items with an expert term (``missing="drop"``)."""
        return self.missing == "drop"

    @property
    def partial(self) -> bool:
        return len(self.covered) < self.total

    def coverage_json(self) -> dict[str, Any]:
        return {"matched": len(self.covered), "total": self.total,
                "sources": [dict(s.to_json(), matched=m) for s, m in zip(self.sources, self.matched)]}

    def describe(self) -> list[str]:
        """Lines saying what was joined and what is scored."""
        lines = [f"expert scores {s.path} ({s.score_field}, {s.rows} rows): {m} of {self.total} kept items matched"
                 for s, m in zip(self.sources, self.matched)]
        how = "z-score" if self.norm == "z" else "z-score of the ranks"
        lines.append(f"expert term: {how} per domain over the evaluated items (label-free, transductive)"
                     + (f", the mean of {len(self.sources)} experts" if len(self.sources) > 1 else ""))
        if self.partial and self.missing == "drop":
            lines.append(f"the expert scores cover {len(self.covered)} of {self.total} kept items: every column "
                         f"below is scored on those {len(self.covered)} items only (--expert-missing blend keeps "
                         "every row)")
        elif self.partial:
            lines.append(f"the expert scores cover {len(self.covered)} of {self.total} kept items; the other "
                         f"{self.total - len(self.covered)} keep their blend (their missing experts count as typical)")
        return lines


def join_experts(records: Sequence[Record], sources: Sequence[ExpertSource], *, kept_ids: Iterable[str],
                 norm: str = "z", missing: str = "drop") -> ExpertJoin:
    """Normalise ``sources`` over the evaluated records and join them by item id.

    ``kept_ids`` are the records the evaluation keeps (the paper's filter); normalisation runs
    over those, or (``missing="drop"``) over those that every source covers.
    """
    if missing not in MISSING:
        raise ValueError(f"unknown --expert-missing {missing!r}; choose one of {', '.join(MISSING)}")
    kept_ids = set(kept_ids)
    domains = {r.item_id: domain_of(r) for r in records}
    matched = [len(kept_ids & set(s.scores)) for s in sources]
    covered = set(kept_ids)
    for s in sources:
        covered &= set(s.scores)
    pool = covered if missing == "drop" else kept_ids
    zs = [normalise({i: s.scores[i] for i in pool if i in s.scores}, domains, norm) for s in sources]
    units = {}
    for item_id in pool:
        values = [z[item_id] for z in zs if item_id in z]
        if values:
            units[item_id] = logistic(float(np.mean(values)))
    return ExpertJoin(sources=list(sources), norm=norm, missing=missing, units=units, covered=covered,
                      total=len(kept_ids), matched=matched)

