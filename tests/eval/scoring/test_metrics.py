"""Evaluation: the released records reproduce the paper's numbers; the bootstrap is right."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomalyclaw.eval.scoring.metrics import _auroc_rows, bootstrap_columns, evaluate, kept, paired_bootstrap
from anomalyclaw.eval.running.records import Record, load_records


def test_released_records_reproduce_paper(reference_dir):
    records = load_records(reference_dir / "results" / "released_qwen35vl27b", strict=True)
    result = evaluate(records, alpha=0.5)
    assert result["rows"] == 1418 and result["kept"] == 1418
    macro = result["macro_auroc"]
    assert round(macro["fused"], 4) == 0.7480
    assert round(macro["direct"], 4) == 0.7128
    assert round(macro["refute"], 4) == 0.7011
    assert set(result["per_domain"]) == {f"D{i}" for i in range(1, 13)}
    assert result["per_domain"]["D7"]["n"] == 98


def test_eval_command_prints_json_last_line(reference_dir):
    out = subprocess.run([sys.executable, "-m", "anomalyclaw", "eval",
                          str(reference_dir / "results" / "released_qwen35vl27b"), "--json"],
                         capture_output=True, text=True, check=True)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["rows"] == 1418 and last["kept"] == 1418
    assert last["macro_auroc"] == {"direct": 0.7128, "refute": 0.7011, "blend": 0.748, "fused": 0.748}
    assert last["per_domain"]["D1"]["n"] == 120
    assert "macro" in out.stdout  # the human table precedes the JSON


def _rec(i, label, d, r, domain="D1", **kw):
    return Record(item_id=f"{domain}_{i}", domain_code=domain, label_gt=label, direct_score=d, refute_score=r, **kw)


def test_filter_drops_errors_missing_scores_and_labels():
    rows = [_rec(1, 1, 0.9, 0.8), _rec(2, 0, 0.1, None), _rec(3, 0, 0.2, 0.1, error="x"),
            _rec(4, None, 0.3, 0.3), _rec(5, 0, 0.2, 0.2, mode="mcq")]
    assert [r.item_id for r in kept(rows)] == ["D1_1"]


def test_fused_is_recomputed_at_alpha():
    rows = [_rec(1, 1, 0.9, 0.1), _rec(2, 0, 0.1, 0.9), _rec(3, 1, 0.8, 0.3), _rec(4, 0, 0.4, 0.6)]
    direct_only = evaluate(rows, alpha=1.0)["macro_auroc"]
    refute_only = evaluate(rows, alpha=0.0)["macro_auroc"]
    assert direct_only["fused"] == direct_only["direct"] == 1.0
    assert refute_only["fused"] == refute_only["refute"] == 0.0


def test_single_class_domain_is_nan_and_left_out_of_macro():
    rows = [_rec(1, 1, 0.9, 0.8), _rec(2, 0, 0.1, 0.2), _rec(3, 0, 0.5, 0.5, domain="D2")]
    result = evaluate(rows)
    assert np.isnan(result["per_domain"]["D2"]["direct"])
    assert result["macro_auroc"]["direct"] == 1.0


def test_vectorised_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(50, 40))
    scores = np.round(rng.random((50, 40)), 1)  # many ties
    fast = _auroc_rows(labels, scores)
    for row in range(50):
        if np.unique(labels[row]).size == 2:
            assert fast[row] == pytest.approx(roc_auc_score(labels[row], scores[row]), abs=1e-12)
        else:
            assert np.isnan(fast[row])


def test_paired_bootstrap_ci_contains_point_and_detects_a_real_gap():
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(200)]
    labels = {i: int(k % 2) for k, i in enumerate(ids)}
    good = {i: labels[i] + rng.normal(0, 0.5) for i in ids}
    noise = {i: rng.normal() for i in ids}
    domains = {i: ("A" if k < 100 else "B") for k, i in enumerate(ids)}
    res = paired_bootstrap(good, noise, labels, domains, n_boot=400, seed=0)
    assert res.ci_low <= res.diff <= res.ci_high
    assert res.ci_low > 0 and res.p_le_zero < 0.01
    same = paired_bootstrap(good, good, labels, domains, n_boot=100)
    assert same.diff == 0 and same.ci_low == 0 and same.ci_high == 0


def test_compare_two_runs_pairs_by_item_id():
    a = [_rec(k, k % 2, (k % 2) * 0.8 + 0.1, 0.5) for k in range(40)]
    b = [_rec(k, k % 2, 0.5, 0.5) for k in range(40)]
    res = bootstrap_columns(a, "direct", "direct", other=b, n_boot=200)
    assert res.n_items == 40 and res.diff == pytest.approx(0.5)


def test_expert_weight_is_chosen_on_calibration_records():
    from anomalyclaw.eval.scoring.weights import choose_expert_weight

    # the expert ranks perfectly, the branches are noise: the smallest weight that lets it decide
    rows = [_rec(k, k % 2, 0.5 + 0.01 * (k % 3), 0.5 - 0.01 * (k % 5), expert_score=0.2 + 0.6 * (k % 2))
            for k in range(20)]
    weight, tried = choose_expert_weight(rows, grid=(0.0, 0.3, 0.9))
    assert weight == 0.3 and tried[0.3] == tried[0.9] == 1.0 and tried[0.0] < 1.0
    # an uninformative expert is not chosen (ties go to the smaller weight)
    rows = [_rec(k, k % 2, 0.2 + 0.6 * (k % 2), 0.3 + 0.4 * (k % 2), expert_score=0.5) for k in range(20)]
    assert choose_expert_weight(rows)[0] == 0.0
    with pytest.raises(ValueError, match="expert_score"):
        choose_expert_weight([_rec(1, 1, 0.5, 0.5)])


def test_table_prints_domain_names_beside_codes_and_keeps_the_figures():
    from anomalyclaw.eval.scoring.tables import format_table

    rows = [_rec(1, 1, 0.9, 0.8), _rec(2, 0, 0.1, 0.2),  # D1: no name in the records, the built-in card's
            Record(item_id="S2_1", domain_code="S2", domain="coin_count", label_gt=1, direct_score=0.7, refute_score=0.6),
            Record(item_id="S2_2", domain_code="S2", domain="coin_count", label_gt=0, direct_score=0.2, refute_score=0.9)]
    result = evaluate(rows)
    assert result["per_domain"]["D1"]["name"] == "industrial manufacturing (MVTec-AD)"
    assert result["per_domain"]["S2"]["name"] == "coin_count"
    lines = format_table(result).splitlines()
    assert lines[0].split()[-1] == "name"
    d1 = next(line for line in lines if line.startswith("D1"))
    s2 = next(line for line in lines if line.startswith("S2"))
    assert d1.endswith("   industrial manufacturing (MVTec-AD)") and s2.endswith("   coin_count")
    # The figures are where they were: code, n, anom, then one column per score.
    assert d1.split()[:4] == ["D1", "2", "1", "1.0000"] and s2.split()[:4] == ["S2", "2", "1", "1.0000"]
