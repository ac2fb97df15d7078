"""Scoring multiple-choice records (``mode: "mcqa"``) as MMAD scores its answers.

MMAD's scorer (``evaluation/examples/helper/summary.py``, ``caculate_accuracy_mmad``, in the
GitHub repository ``jam-cc/MMAD``) does, per answer file:

1. the dataset is the image path's first component; Object Structure and Object Details are one
   type, Object Analysis;
2. an answer (or a correct answer) that is not a letter A-E is dropped;
3. per dataset and type, accuracy = correct / total; for Anomaly Detection the cell is the
   balanced accuracy (normal accuracy + anomalous accuracy) / 2, where an image is normal when
   its path contains ``good``;
4. a dataset's average is the mean over its type columns, and the score is the mean of those
   averages over datasets (both unweighted).

Here the same, for each branch (``mcq_answer["direct"]`` and ``["refute"]``), with three
differences, all stated in every output that could be read otherwise:

* unparseable answers (a branch that gave no letter after its repair retry, and error records)
  are dropped as MMAD drops them, and separately counted as wrong (``unparsed``); MMAD's loop
  also skips the record after each dropped one (it removes from the list it iterates), which is
  not reproduced: with no unparseable answers the two agree exactly, otherwise MMAD leaves out up
  to as many more parsed answers as it dropped;
* a (dataset, type) cell without questions is left out of the means, where MMAD's table would
  hold 0 (every dataset of MMAD's own file asks every type, so its figure is unaffected), and an
  Anomaly Detection cell with only normal or only anomalous images is that group's accuracy,
  where MMAD would average it with 0;
* ``--bootstrap`` resamples images (all questions about an image together) within each dataset,
  the same draw for both branches, for intervals of refutation minus direct.

Accuracies are percentages, as MMAD reports them.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from anomalyclaw.eval.running.records import MCQA_MODE, Record

#: The seven scored types, in MMAD's column order.
SCORED_TYPES = ("Anomaly Detection", "Defect Classification", "Defect Localization", "Defect Description",
                "Defect Analysis", "Object Classification", "Object Analysis")
MERGED_TYPES = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
LETTERS = frozenset("ABCDE")
NORMAL_FLAG = "good"
BRANCHES = ("direct", "refute")


def is_mcq(record: Record) -> bool:
    return record.mode == MCQA_MODE


def split_records(records: Iterable[Record]) -> tuple[list[Record], list[Record]]:
    """(score records, multiple-choice records): the two are evaluated separately, never mixed."""
    score, mcq = [], []
    for r in records:
        (mcq if is_mcq(r) else score).append(r)
    return score, mcq


@dataclass(frozen=True)
class McqRow:
    """One scorable question: where it counts and what each branch answered (None: unparsed)."""

    question_id: str
    image: str
    dataset: str
    question_type: str
    normal: bool
    answer: str
    direct: str | None
    refute: str | None

    def answer_of(self, branch: str) -> str | None:
        value = self.direct if branch == "direct" else self.refute
        return value if value in LETTERS else None


def mcq_rows(records: Iterable[Record]) -> tuple[list[McqRow], int]:
    """The scorable rows of MCQ records, and how many records could not be scored at all (a
    question the loader rejected without a valid answer letter or type)."""
    rows, unscorable = [], 0
    for r in records:
        if not is_mcq(r):
            continue
        extra = r.model_extra or {}
        answer, qtype, image = extra.get("answer"), extra.get("question_type"), extra.get("image") or ""
        if answer not in LETTERS or not isinstance(qtype, str) or not qtype:
            unscorable += 1
            continue
        answers = extra.get("mcq_answer")
        if isinstance(answers, str):  # a released record's single answer is the agent's
            answers = {"refute": answers}
        answers = answers if isinstance(answers, dict) and not r.error else {}
        dataset = extra.get("dataset") or (image.split("/")[0] if image else None) or r.domain_code or "?"
        rows.append(McqRow(question_id=r.item_id, image=image, dataset=str(dataset),
                           question_type=MERGED_TYPES.get(qtype, qtype), normal=NORMAL_FLAG in image,
                           answer=answer, direct=answers.get("direct"), refute=answers.get("refute")))
    return rows, unscorable


def _type_order(types: Iterable[str]) -> list[str]:
    known = [t for t in SCORED_TYPES if t in set(types)]
    return known + sorted(set(types) - set(SCORED_TYPES))


class _Arrays:
    """The rows as index arrays, so that a bootstrap draw is a weight vector over rows."""

    def __init__(self, rows: Sequence[McqRow]):
        self.datasets = sorted({r.dataset for r in rows})
        self.types = _type_order({r.question_type for r in rows})
        self.images = sorted({r.image for r in rows})
        d_index = {d: i for i, d in enumerate(self.datasets)}
        t_index = {t: i for i, t in enumerate(self.types)}
        i_index = {im: i for i, im in enumerate(self.images)}
        self.d = np.array([d_index[r.dataset] for r in rows], dtype=int)
        self.t = np.array([t_index[r.question_type] for r in rows], dtype=int)
        self.img = np.array([i_index[r.image] for r in rows], dtype=int)
        self.normal = np.array([r.normal for r in rows], dtype=bool)
        self.ad = self.t == t_index.get("Anomaly Detection", -1)
        self.parsed = {b: np.array([r.answer_of(b) is not None for r in rows], dtype=bool) for b in BRANCHES}
        self.correct = {b: np.array([r.answer_of(b) == r.answer for r in rows], dtype=bool) for b in BRANCHES}
        self.image_dataset = np.zeros(len(self.images), dtype=int)
        self.image_dataset[self.img] = self.d

    def table(self, branch: str, weights: np.ndarray, *, drop: bool) -> np.ndarray:
        """Accuracy in percent per (dataset, type) [D, T]; NaN where a cell has no question."""
        n_d, n_t = len(self.datasets), len(self.types)
        w = weights * (self.parsed[branch] if drop else 1.0)
        hit = w * self.correct[branch]
        cell = self.d * n_t + self.t

        def acc(mask: np.ndarray) -> np.ndarray:
            total = np.bincount(cell, weights=w * mask, minlength=n_d * n_t)
            good = np.bincount(cell, weights=hit * mask, minlength=n_d * n_t)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(total > 0, good / total, np.nan).reshape(n_d, n_t)

        out = acc(np.ones_like(w))
        if self.ad.any():
            col = self.types.index("Anomaly Detection")
            with _quiet():  # a dataset with one group only: that group's accuracy
                out[:, col] = np.nanmean(np.stack([acc(self.normal)[:, col], acc(~self.normal)[:, col]]), axis=0)
        return out * 100.0

    def has_cell(self) -> np.ndarray:
        """bool [D, T]: which (dataset, type) cells hold questions."""
        cells = np.zeros((len(self.datasets), len(self.types)), dtype=bool)
        cells[self.d, self.t] = True
        return cells

    def summary(self, branch: str, weights: np.ndarray, *, drop: bool) -> tuple[float, np.ndarray, np.ndarray]:
        """(MMAD average, per-dataset averages [D], per-type means over datasets [T])."""
        cells = self.table(branch, weights, drop=drop)
        with _quiet():
            per_dataset = np.nanmean(cells, axis=1)
            per_type = np.nanmean(cells, axis=0)
            overall = float(np.nanmean(per_dataset)) if np.isfinite(per_dataset).any() else float("nan")
        return overall, per_dataset, per_type


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence NumPy's "mean of empty slice" warning: an empty cell is NaN by design."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _agreement(rows: Sequence[McqRow]) -> float:
    both = [r for r in rows if r.answer_of("direct") is not None and r.answer_of("refute") is not None]
    return 100.0 * sum(r.direct == r.refute for r in both) / len(both) if both else float("nan")


def evaluate_mcqa(records: Sequence[Record]) -> dict[str, Any]:
    """MMAD's scores of both branches.

    Returns ``{"n", "accuracy": {"direct", "refute", "agree"}, "per_type": {type: {"direct",
    "refute", "agree", "n"}}, "per_dataset": {dataset: {...}}, "unparsed": {"direct": k,
    "refute": k, "errors": k, "unscorable": k, "accuracy": {...}, "per_type": {...},
    "per_dataset": {...}}, "cells": {dataset: {type: {"direct", "refute"}}}}``: ``accuracy``
    drops unparseable answers (MMAD's number), ``unparsed`` counts them as wrong.
    """
    mcq = [r for r in records if is_mcq(r)]
    rows, unscorable = mcq_rows(mcq)
    out: dict[str, Any] = {"n": len(rows)}
    if not rows:
        out.update(accuracy={b: float("nan") for b in BRANCHES}, per_type={}, per_dataset={},
                   unparsed={"direct": 0, "refute": 0, "errors": 0, "unscorable": unscorable})
        return out
    arrays = _Arrays(rows)
    ones = np.ones(len(rows))

    def block(drop: bool) -> dict[str, Any]:
        res = {b: arrays.summary(b, ones, drop=drop) for b in BRANCHES}
        per_type = {t: {b: float(res[b][2][k]) for b in BRANCHES} for k, t in enumerate(arrays.types)}
        per_dataset = {d: {b: float(res[b][1][k]) for b in BRANCHES} for k, d in enumerate(arrays.datasets)}
        cells = {b: arrays.table(b, ones, drop=drop) for b in BRANCHES}
        present = arrays.has_cell()
        return {"accuracy": {b: res[b][0] for b in BRANCHES}, "per_type": per_type, "per_dataset": per_dataset,
                "cells": {d: {t: {b: float(cells[b][i, k]) for b in BRANCHES} for k, t in enumerate(arrays.types)
                              if present[i, k]} for i, d in enumerate(arrays.datasets)}}

    dropped, wrong = block(True), block(False)
    by_type: dict[str, list[McqRow]] = defaultdict(list)
    by_dataset: dict[str, list[McqRow]] = defaultdict(list)
    for r in rows:
        by_type[r.question_type].append(r)
        by_dataset[r.dataset].append(r)
    for t, entry in dropped["per_type"].items():
        entry.update(agree=_agreement(by_type[t]), n=len(by_type[t]))
    for d, entry in dropped["per_dataset"].items():
        entry.update(agree=_agreement(by_dataset[d]), n=len(by_dataset[d]))
    out.update(accuracy={**dropped["accuracy"], "agree": _agreement(rows)}, per_type=dropped["per_type"],
               per_dataset=dropped["per_dataset"],
               unparsed={"direct": sum(r.answer_of("direct") is None for r in rows),
                         "refute": sum(r.answer_of("refute") is None for r in rows),
                         "errors": sum(1 for r in mcq if r.error), "unscorable": unscorable,
                         "accuracy": wrong["accuracy"], "per_type": wrong["per_type"],
                         "per_dataset": wrong["per_dataset"]},
               cells=dropped["cells"])
    return out


@dataclass
class McqBootstrap:
    """Refutation minus direct MMAD average (overall and per type) with percentile intervals."""

    diff: float
    ci_low: float
    ci_high: float
    p_le_zero: float
    per_type: dict[str, dict[str, float]]
    n_questions: int
    n_images: int
    n_boot: int
    level: float

    def to_json(self) -> dict[str, Any]:
        return {"a": "refute", "b": "direct", "diff": self.diff, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "p_le_zero": self.p_le_zero, "per_type": self.per_type, "n_questions": self.n_questions,
                "n_images": self.n_images, "n_boot": self.n_boot, "level": self.level}


def bootstrap_mcqa(records: Sequence[Record], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> McqBootstrap:
    """Paired bootstrap of refutation minus direct (MMAD's number, unparseable answers dropped):
    images are drawn with replacement within each dataset, the same draw for both branches."""
    rows, _ = mcq_rows(records)
    if not rows:
        raise ValueError("no scorable multiple-choice records to bootstrap")
    arrays = _Arrays(rows)
    ones = np.ones(len(rows))
    point = {b: arrays.summary(b, ones, drop=True) for b in BRANCHES}
    rng = np.random.default_rng(seed)
    by_dataset = [np.flatnonzero(arrays.image_dataset == k) for k in range(len(arrays.datasets))]
    diffs = np.empty(n_boot)
    type_diffs = np.empty((n_boot, len(arrays.types)))
    for k in range(n_boot):
        counts = np.zeros(len(arrays.images))
        for members in by_dataset:
            np.add.at(counts, rng.choice(members, size=members.size, replace=True), 1.0)
        w = counts[arrays.img]
        d = arrays.summary("direct", w, drop=True)
        r = arrays.summary("refute", w, drop=True)
        diffs[k] = r[0] - d[0]
        type_diffs[k] = r[2] - d[2]
    tail = (1.0 - level) / 2.0
    per_type = {}
    with _quiet():
        for j, t in enumerate(arrays.types):
            col = type_diffs[:, j][np.isfinite(type_diffs[:, j])]
            per_type[t] = {"diff": float(point["refute"][2][j] - point["direct"][2][j]),
                           "ci_low": float(np.quantile(col, tail)) if col.size else float("nan"),
                           "ci_high": float(np.quantile(col, 1 - tail)) if col.size else float("nan")}
    ok = diffs[np.isfinite(diffs)]
    return McqBootstrap(diff=float(point["refute"][0] - point["direct"][0]), ci_low=float(np.quantile(ok, tail)),
                        ci_high=float(np.quantile(ok, 1 - tail)), p_le_zero=float(np.mean(ok <= 0)),
                        per_type=per_type, n_questions=len(rows), n_images=len(arrays.images), n_boot=int(ok.size),
                        level=level)


def format_mcqa_table(result: dict[str, Any], *, backends: Sequence[str] = ()) -> str:
    """Per-type and per-dataset accuracy of both branches and their agreement (percent)."""
    def fmt(v: Any) -> str:
        return f"{v:>8.1f}" if isinstance(v, float) and math.isfinite(v) else f"{'n/a':>8}"

    head = f"{'MMAD type':<24}{'n':>6}{'direct':>8}{'refute':>8}{'agree':>8}"
    lines = ["multiple-choice accuracy (%), scored as MMAD scores it (unparseable answers dropped)"]
    if any(b == "offline" or b.startswith("offline ") for b in backends):
        lines.append("backend offline: the rule-based stand-in answering from its tools, not a VLM")
    lines += [head, "-" * len(head)]
    for t, d in result["per_type"].items():
        lines.append(f"{t:<24}{d['n']:>6}" + fmt(d["direct"]) + fmt(d["refute"]) + fmt(d["agree"]))
    lines.append("-" * len(head))
    lines.append(f"{'dataset':<24}")
    for name, d in result["per_dataset"].items():
        lines.append(f"{name:<24}{d['n']:>6}" + fmt(d["direct"]) + fmt(d["refute"]) + fmt(d["agree"]))
    lines.append("-" * len(head))
    acc = result["accuracy"]
    lines.append(f"{'MMAD average':<24}{result['n']:>6}" + fmt(acc["direct"]) + fmt(acc["refute"])
                 + fmt(acc.get("agree")))
    un = result["unparsed"]
    if un.get("direct") or un.get("refute"):
        wrong = un["accuracy"]
        lines.append(f"unparseable answers counted as wrong instead: direct {wrong['direct']:.1f} "
                     f"({un['direct']} unparsed), refute {wrong['refute']:.1f} ({un['refute']} unparsed)"
                     + (f"; {un['errors']} error records among them" if un.get("errors") else ""))
    else:
        lines.append("every answer parsed: dropping and counting unparseable answers as wrong agree")
    if un.get("unscorable"):
        lines.append(f"({un['unscorable']} records left out: a question without a valid answer letter or type)")
    return "\n".join(lines)
