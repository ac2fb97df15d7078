"""The image threshold: F1-max on calibration, applied per domain and macro."""
from __future__ import annotations

import pytest

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.thresholds import choose_threshold, decision_metrics, f1_max_threshold


def test_f1_max_threshold_is_halfway_below_the_best_score():
    # Scores 0.1 0.2 0.4 | 0.6 0.8 anomalous, 0.3 normal is above 0.2. Best rule: >= 0.6 (F1 1.0);
    # halfway to the next lower score (0.4): 0.5.
    labels = [0, 0, 0, 1, 1, 0]
    scores = [0.1, 0.2, 0.4, 0.6, 0.8, 0.3]
    t, f1 = f1_max_threshold(labels, scores)
    assert t == pytest.approx(0.5) and f1 == pytest.approx(1.0)
    # Overlap: 0.5 normal between anomalous 0.4 and 0.6: ">= 0.4" gives P 2/3 R 1 (F1 0.8), ">= 0.6"
    # gives P 1 R 1/2 (F1 0.667): the lower rule wins, halfway to 0.2 -> 0.3.
    t, f1 = f1_max_threshold([0, 1, 0, 1], [0.2, 0.4, 0.5, 0.6])
    assert t == pytest.approx(0.3) and f1 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no anomalous"):
        f1_max_threshold([0, 0], [0.1, 0.2])


def _rec(i, code, label, score, error=None):
    return Record(item_id=f"{code}_{i}", domain_code=code, label_gt=label, anomaly_score=score, error=error)


def test_decision_metrics_per_domain_and_macro():
    cal = [_rec(0, "A", 0, 0.2), _rec(1, "A", 1, 0.8), _rec(2, "B", 0, 0.4), _rec(3, "B", 1, 0.6)]
    t, _ = choose_threshold(cal)
    assert t == pytest.approx(0.5)
    test = [_rec(0, "A", 0, 0.1), _rec(1, "A", 1, 0.9), _rec(2, "A", 1, 0.45),     # A: one miss
            _rec(3, "B", 0, 0.55), _rec(4, "B", 1, 0.7),                          # B: one false alarm
            _rec(5, "B", 1, None), _rec(6, "B", 1, 0.9, error="boom")]            # left out
    out = decision_metrics(test, t)
    a, b = out["per_domain"]["A"], out["per_domain"]["B"]
    assert (a["precision"], a["recall"], a["accuracy"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert (b["precision"], b["recall"], b["accuracy"], b["n"]) == pytest.approx((0.5, 1.0, 0.5, 2))
    assert a["f1"] == pytest.approx(2 / 3) and b["f1"] == pytest.approx(2 / 3)
    assert out["macro"]["f1"] == pytest.approx(2 / 3) and out["macro"]["accuracy"] == pytest.approx(7 / 12)
    assert out["pooled"]["n"] == 5 and out["threshold"] == t
