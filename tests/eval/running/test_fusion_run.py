"""`run` fuses the expert term by default; `--expert-weight 0` is the paper's blend exactly; the
records keep every part of the fusion, so eval recomputes it."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.cli import main
from anomalyclaw.eval.running.records import read_records
from anomalyclaw.experts.pool import FUSION_EXPERTS
from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT, fuse, logistic


def _run(small_synth, out, *extra):
    code = main(["run", "--manifest", str(small_synth), "--split", "test", "--limit", "4", "--out", str(out),
                 "--backend", "offline", "--no-progress", "--json", *extra])
    assert code == 0
    return {r.item_id: r for r in read_records(out).records}


def test_run_fuses_the_expert_term_by_default_and_weight_zero_is_the_blend(small_synth, tmp_path, capsys):
    default = _run(small_synth, tmp_path / "default")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(default) == 4
    for r in default.values():
        assert set(r.expert_z) == set(FUSION_EXPERTS)
        assert r.expert_score == pytest.approx(logistic(sum(r.expert_z.values()) / len(r.expert_z)))
        assert (r.w_direct, r.w_v9, r.w_expert) == (0.5, 0.5, DEFAULT_EXPERT_WEIGHT)
        assert r.anomaly_score == pytest.approx(fuse(r.direct_score, r.refute_score, 0.5, r.expert_score, 0.2))
        assert 0.0 <= r.anomaly_score <= 1.0
    assert "expert" in last["macro_auroc"] and "blend" in last["macro_auroc"]

    off = _run(small_synth, tmp_path / "off", "--expert-weight", "0")
    capsys.readouterr()
    for item_id, r in off.items():
        assert r.anomaly_score == 0.5 * r.direct_score + 0.5 * r.refute_score  # the paper's blend, exactly
        assert r.w_expert == 0.0
        same = default[item_id]
        assert (r.direct_score, r.refute_score, r.expert_score) == (same.direct_score, same.refute_score,
                                                                    same.expert_score)

    # eval reads each run's own weight back, so its fused column is the run's anomaly_score.
    for folder, weight in (("default", 0.2), ("off", 0.0)):
        assert main(["eval", str(tmp_path / folder), "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["expert_weight"] == weight
    for bad in ("x", "-0.5", "nan"):
        assert main(["run", "--manifest", str(small_synth), "--out", str(tmp_path / "bad"), "--expert-weight", bad]) == 2
        assert "argument --expert-weight: expected a number >= 0" in capsys.readouterr().err
    # Weights of 1 and above are weights like any other now (the fused score stays in [0, 1]).
    heavy = _run(small_synth, tmp_path / "heavy", "--expert-weight", "3")
    assert all(0.0 <= r.anomaly_score <= 1.0 and r.w_expert == 3.0 for r in heavy.values())
