"""Multiple-choice scoring follows MMAD's summary.py: balanced accuracy for Anomaly Detection
(normal = 'good' in the image path), Object Structure + Object Details as Object Analysis, the
mean over types per dataset, then over datasets; unparseable answers dropped, and counted as
wrong separately."""
from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.mcqa import (bootstrap_mcqa, evaluate_mcqa, format_mcqa_table, mcq_rows,
                                           split_records)


def rec(image, qtype, answer, direct, refute, *, index=0, error=None, backend="fake"):
    return Record(item_id=f"{image}#{index}", mode="mcqa", error=error, backend=backend,
                  question_id=f"{image}#{index}", image=image, dataset=image.split("/")[0], question_type=qtype,
                  answer=answer, mcq_answer={"direct": direct, "refute": refute})


def mmad_reference(rows: list[tuple[str, str, str, str | None]]) -> float:
    """MMAD's caculate_accuracy_mmad, restated from its description in plain loops: rows are
    (image, type, correct answer, given answer); non-letters are dropped (without the loop's skip)."""
    stats = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    det = defaultdict(lambda: {"normal": [0, 0], "abnormal": [0, 0]})
    for image, qtype, correct, given in rows:
        if given not in list("ABCDE") or correct not in list("ABCDE"):
            continue
        qtype = "Object Analysis" if qtype in ("Object Structure", "Object Details") else qtype
        ds = image.split("/")[0]
        stats[ds][qtype][0] += 1
        stats[ds][qtype][1] += int(given == correct)
        if qtype == "Anomaly Detection":
            group = det[ds]["normal" if "good" in image else "abnormal"]
            group[0] += 1
            group[1] += int(given == correct)
    averages = []
    for ds, types in stats.items():
        cells = []
        for qtype, (total, right) in types.items():
            if qtype == "Anomaly Detection":
                n, a = det[ds]["normal"], det[ds]["abnormal"]
                cells.append((n[1] / n[0] + a[1] / a[0]) / 2 * 100)
            else:
                cells.append(right / total * 100)
        averages.append(sum(cells) / len(cells))
    return sum(averages) / len(averages)


@pytest.fixture
def records():
    out = []
    # dataset X: 3 normal + 1 anomalous AD questions, one classification, structure + details
    for i, (img, ans, d, r) in enumerate([("X/c/image/good/0.png", "B", "B", "B"), ("X/c/image/good/1.png", "B", "A", "B"),
                                          ("X/c/image/good/2.png", "B", "A", "A"), ("X/c/image/crack/3.png", "A", "A", "A")]):
        out.append(rec(img, "Anomaly Detection", ans, d, r))
    out.append(rec("X/c/image/crack/3.png", "Defect Classification", "C", "A", "C", index=1))
    out.append(rec("X/c/image/crack/3.png", "Object Structure", "A", "A", "B", index=2))
    out.append(rec("X/c/image/good/0.png", "Object Details", "D", "D", "D", index=1))
    # dataset Y: AD on one normal and one anomalous image; localization unparsed for direct
    out.append(rec("Y/k/test/good/0.png", "Anomaly Detection", "B", "B", "A"))
    out.append(rec("Y/k/test/bad/1.png", "Anomaly Detection", "A", "B", "A"))
    out.append(rec("Y/k/test/bad/1.png", "Defect Localization", "C", None, "C", index=1))
    out.append(rec("Y/k/test/bad/2.png", "Defect Localization", "D", "D", "A", index=0, error="image: gone"))
    return out


def test_matches_mmads_scoring(records):
    result = evaluate_mcqa(records)
    for branch in ("direct", "refute"):
        rows = []
        for r in records:
            x = r.model_extra
            given = None if r.error else x["mcq_answer"][branch]
            rows.append((x["image"], x["question_type"], x["answer"], given))
        assert result["accuracy"][branch] == pytest.approx(mmad_reference(rows))
    # by hand: X direct AD = (1/3 + 1)/2 = 66.7, DC 0, OA (1 + 1)/2 ... Object Analysis merges both
    x = result["per_dataset"]["X"]
    assert x["direct"] == pytest.approx((200 / 3 + 0 + 100) / 3)
    assert set(result["per_type"]) == {"Anomaly Detection", "Defect Classification", "Defect Localization",
                                       "Object Analysis"}
    assert result["per_type"]["Object Analysis"]["n"] == 2
    assert result["per_type"]["Anomaly Detection"]["n"] == 6 and result["n"] == 11


def test_unparsed_answers_are_dropped_and_separately_counted_as_wrong(records):
    result = evaluate_mcqa(records)
    un = result["unparsed"]
    assert un["direct"] == 2 and un["refute"] == 1 and un["errors"] == 1  # the error record counts for both
    # Y localization: direct drops both questions (no cell), refute drops the error one only
    assert "Defect Localization" not in result["cells"]["Y"] or math.isnan(result["cells"]["Y"]["Defect Localization"]["direct"])
    assert un["per_dataset"]["Y"]["direct"] == pytest.approx((50 + 0) / 2)
    assert result["per_dataset"]["Y"]["direct"] == pytest.approx(50.0)  # only the AD cell is left
    assert un["accuracy"]["refute"] < result["accuracy"]["refute"]
    assert un["per_type"]["Defect Localization"]["refute"] == pytest.approx(50.0)
    assert result["per_type"]["Defect Localization"]["refute"] == pytest.approx(100.0)


def test_agreement_and_table(records):
    result = evaluate_mcqa(records)
    both = [(r.model_extra["mcq_answer"]["direct"], r.model_extra["mcq_answer"]["refute"]) for r in records
            if not r.error and None not in r.model_extra["mcq_answer"].values()]
    assert result["accuracy"]["agree"] == pytest.approx(100 * sum(a == b for a, b in both) / len(both))
    text = format_mcqa_table(result, backends=["offline"])
    assert "Anomaly Detection" in text and "Object Analysis" in text and "stand-in" in text
    assert "counted as wrong instead: direct" in text


def test_balanced_accuracy_with_one_group_is_that_groups_accuracy():
    result = evaluate_mcqa([rec("Z/c/bad/0.png", "Anomaly Detection", "A", "A", "B")])
    assert result["per_type"]["Anomaly Detection"]["direct"] == 100.0
    assert result["per_type"]["Anomaly Detection"]["refute"] == 0.0


def test_bootstrap_is_paired_and_repeatable(records):
    b = bootstrap_mcqa(records, n_boot=300, seed=3)
    point = evaluate_mcqa(records)["accuracy"]
    assert b.diff == pytest.approx(point["refute"] - point["direct"])
    assert b.ci_low <= b.diff <= b.ci_high and b.n_images == 7 and b.n_questions == 11
    again = bootstrap_mcqa(records, n_boot=300, seed=3)
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(b.to_json(), sort_keys=True)  # NaN-safe
    same = [rec(f"S/c/{'good' if i % 2 else 'bad'}/{i}.png", "Anomaly Detection", "A", l, l)
            for i, l in enumerate("AABBAB")]
    tied = bootstrap_mcqa(same, n_boot=100)
    assert tied.diff == 0 and tied.ci_low == 0 and tied.ci_high == 0


def test_score_and_mcq_records_stay_apart(records):
    score = Record(item_id="D1_0001", direct_score=0.2, refute_score=0.4, label_gt=0, domain_code="D1")
    plain, mcq = split_records([score, *records])
    assert plain == [score] and len(mcq) == len(records)
    rows, unscorable = mcq_rows([*records, Record(item_id="bad", mode="mcqa", error="question: no answer")])
    assert len(rows) == len(records) and unscorable == 1
