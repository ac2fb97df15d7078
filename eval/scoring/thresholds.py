"""The image decision: a threshold chosen on calibration records (F1-max), and F1, precision,
recall and accuracy at it, per domain and macro.

An item is predicted anomalous when its score is at or above the threshold. The threshold is
chosen on the pooled calibration items (one threshold for every domain, the number ``run
--threshold`` takes): of the distinct calibration scores, the one whose "score >= t" rule has
the highest F1 (ties: the lowest such score), then moved halfway down to the next lower
calibration score, so a test score equal to the chosen calibration score is still called
anomalous while the margin to the normal side is split evenly.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_curve, precision_recall_fscore_support

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.metrics import by_domain

ScoreOf = Callable[[Record], "float | None"]


def record_score(r: Record) -> float | None:
    """The score a record carries (``anomaly_score``, whatever fusion made it)."""
    return r.anomaly_score


def _labelled(records: Sequence[Record], score_of: ScoreOf) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(int(r.label_gt), float(s)) for r in records
             if not r.error and r.label_gt in (0, 1) and (s := score_of(r)) is not None and math.isfinite(s)]
    if not pairs:
        return np.zeros(0, int), np.zeros(0)
    labels, scores = zip(*pairs)
    return np.asarray(labels), np.asarray(scores, float)


def f1_max_threshold(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, F1 at it on these items), as the module docstring chooses it. Raises
    ValueError when there is no anomalous item (F1 is undefined)."""
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    if y.size == 0 or not (y == 1).any():
        raise ValueError("no anomalous calibration item with a score: cannot choose an F1-max threshold")
    precision, recall, thresholds = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
    best = int(np.argmax(f1))
    chosen = float(thresholds[best])
    below = s[s < chosen]
    threshold = (chosen + float(below.max())) / 2.0 if below.size else chosen
    return threshold, float(f1[best])


def choose_threshold(calibration: Sequence[Record], score_of: ScoreOf = record_score) -> tuple[float, float]:
    """The F1-max threshold of ``calibration`` records' scores (``score_of``; default their
    ``anomaly_score``) and the calibration F1 at it."""
    labels, scores = _labelled(calibration, score_of)
    return f1_max_threshold(labels, scores)


def _scores_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (scores >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="binary",
                                                               pos_label=1, zero_division=0)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall),
            "accuracy": float(accuracy_score(labels, predicted)), "n": int(labels.size),
            "n_anomalous": int(labels.sum()), "n_predicted_anomalous": int(predicted.sum())}


def decision_metrics(records: Sequence[Record], threshold: float, score_of: ScoreOf = record_score) -> dict:
    """F1, precision, recall and accuracy at ``threshold``, per domain and macro (the unweighted
    mean over domains), plus the pooled values: ``{"threshold", "macro", "pooled",
    "per_domain": {code: {...}}}``. Items with an error, no label or no score are left out."""
    per_domain = {}
    for code, group in by_domain(records).items():
        labels, scores = _labelled(group, score_of)
        if labels.size:
            per_domain[code] = _scores_at(labels, scores, threshold)
    metrics = ("f1", "precision", "recall", "accuracy")
    macro = {m: float(np.mean([d[m] for d in per_domain.values()])) if per_domain else float("nan")
             for m in metrics}
    labels, scores = _labelled(records, score_of)
    pooled = _scores_at(labels, scores, threshold) if labels.size else {}
    return {"threshold": threshold, "macro": macro, "pooled": pooled, "per_domain": per_domain}


def format_decision_table(result: dict) -> str:
    """The decision metrics as a fixed-width table."""
    head = f"{'domain':<10}{'n':>6}{'anom':>6}{'called':>8}{'F1':>8}{'prec':>8}{'recall':>8}{'acc':>8}"
    lines = [f"image threshold {result['threshold']:.4f} (anomalous when score >= it)", head, "-" * len(head)]
    for code, d in result["per_domain"].items():
        lines.append(f"{code:<10}{d['n']:>6}{d['n_anomalous']:>6}{d['n_predicted_anomalous']:>8}"
                     + "".join(f"{d[m]:>8.4f}" for m in ("f1", "precision", "recall", "accuracy")))
    m = result["macro"]
    lines += ["-" * len(head), f"{'macro':<10}{'':>6}{'':>6}{'':>8}"
              + "".join(f"{m[k]:>8.4f}" for k in ("f1", "precision", "recall", "accuracy"))]
    return "\n".join(lines)
