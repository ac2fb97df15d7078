"""Reading records loses nothing silently: nulls read as defaults, labels and scores are read in
their accepted forms, everything else is counted per file and field, named, and fails --strict."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.cli import main
from anomalyclaw.eval.running.records import (RECORDS_FILE, Record, parse_label, parse_score, read_records,
                                              record_files)

LIST_FIELDS = ("tools_used", "candidate_features", "remaining_features", "refutation_verdicts", "history")


def _released_row(i: int, label: int, **changes) -> dict:
    """A row in the released D*.json format (every field the release writes)."""
    row = {"item_id": f"D1_{i:04d}", "domain_code": "D1", "label_gt": label, "mode": "anomaly_detection",
           "anomaly_score": 0.5, "direct_score": 0.2 + 0.6 * label - 0.01 * i, "v9_score": 0.3 + 0.4 * label,
           "v9_initial_score": 0.3, "v9_updated_score": None, "rationale": "r", "n_turns": 1, "tools_used": [],
           "confidence": 0.8, "candidate_features": [], "remaining_features": [], "refutation_verdicts": [],
           "history": [{"turn": 1}], "w_direct": 0.5, "w_v9": 0.5, "error": None, "direct_error": None,
           "direct_rationale": None, "mcq_answer": None}
    row.update(changes)
    return row


def _eval(capsys, *argv: str) -> tuple[int, dict, str, str]:
    code = main(["eval", *argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), out, err


def test_null_list_and_optional_fields_keep_every_row(tmp_path, capsys):
    rows = [_released_row(i, i % 2) for i in range(8)]
    for row in rows[:4]:
        row.update({name: None for name in LIST_FIELDS})
    rows[5].update(rationale=None, n_turns=None, w_direct=None, mode=None, fallbacks=None, timings=None)
    (tmp_path / "D1.json").write_text(json.dumps(rows))
    read = read_records(tmp_path)
    assert len(read.records) == 8 and read.clean
    assert all(getattr(r, name) == [] for r in read.records[:4] for name in LIST_FIELDS)
    assert read.records[5].rationale == "" and read.records[5].mode == "anomaly_detection"
    code, last, out, err = _eval(capsys, str(tmp_path), "--strict")
    assert code == 0 and last["rows"] == last["kept"] == 8 and last["unreadable"] == 0
    assert "rows 8, kept 8" in out and err == ""


def test_released_file_with_null_list_fields_loses_no_row(reference_dir, tmp_path, capsys):
    rows = json.loads((reference_dir / "results" / "released_qwen35vl27b" / "D1.json").read_text())
    for row in rows[::3]:
        row.update(candidate_features=None, remaining_features=None)
    (tmp_path / "D1.json").write_text(json.dumps(rows))
    code, last, _, _ = _eval(capsys, str(tmp_path), "--strict")
    assert code == 0 and last["rows"] == last["kept"] == len(rows) == 120
    assert last["macro_auroc"]["fused"] == 0.9558  # the released D1 figure


def test_one_broken_row_is_counted_named_and_fails_strict(tmp_path, capsys):
    good = [Record(item_id=f"a{i}", domain_code="S1", label_gt=i % 2, direct_score=0.1 + 0.2 * (i % 2) + 0.01 * i,
                   refute_score=0.5).to_line() for i in range(6)]
    lines = good[:3] + ['{"item_id": "a9", "direct_sc'] + good[3:]
    (tmp_path / RECORDS_FILE).write_text("\n".join(lines) + "\n")
    code, last, out, err = _eval(capsys, str(tmp_path))
    assert code == 0 and last["unreadable"] == 1 and last["rows"] == 7 and last["kept"] == 6
    assert f"1 unreadable rows (first: {tmp_path / RECORDS_FILE}:4: not valid JSON" in err
    assert last["left_out"] == {"unreadable": 1}
    code, last, _, err = _eval(capsys, str(tmp_path), "--strict")
    assert code == 1 and "--strict" in err and last["unreadable"] == 1


def test_a_broken_calibration_row_is_read_once_and_fails_strict(tmp_path, capsys):
    def lines(prefix):
        return [Record(item_id=f"{prefix}{i}", domain_code="S1", label_gt=i % 2, expert_score=0.2 + 0.1 * i,
                       direct_score=0.1 + 0.2 * (i % 2) + 0.01 * i, refute_score=0.5).to_line() for i in range(6)]
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / RECORDS_FILE).write_text("\n".join(lines("t")) + "\n")
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / RECORDS_FILE).write_text("\n".join(lines("c")[:3] + ['{"item_id": "c9", "dir'] + lines("c")[3:])
                                                 + "\n")
    # The calibration run chooses both the expert weight and the threshold: read (and counted) once.
    code, last, out, err = _eval(capsys, str(tmp_path / "test"), "--calibration", str(tmp_path / "cal"))
    assert code == 0 and err.count("1 unreadable rows") == 1 and out.count("read calibration") == 1
    assert "expert weight chosen on calibration" in out and "image threshold chosen on calibration" in out
    code, _, _, err = _eval(capsys, str(tmp_path / "test"), "--calibration", str(tmp_path / "cal"), "--strict",
                            "--expert-weight", "0.3")
    assert code == 1 and f"{tmp_path / 'cal'}: 1 unreadable rows" in err


def test_rows_without_an_id_or_not_objects_are_unreadable(tmp_path, capsys):
    rows = [_released_row(0, 0), [1, 2], {"direct_score": 0.4}, _released_row(1, 1, item_id=7), _released_row(2, 1)]
    (tmp_path / "D1.json").write_text(json.dumps(rows))
    read = read_records(tmp_path)
    assert [r.item_id for r in read.records] == ["D1_0000", "D1_0002"] and read.rows == 5
    assert [why for _, why in read.unreadable] == ["not a JSON object", "no string item_id (got null)",
                                                   "no string item_id (got 7)"]
    assert read.unreadable[0][0] == f"{tmp_path / 'D1.json'}[1]"


@pytest.mark.parametrize("value, expected", [(0, 0), (1, 1), (0.0, 0), (True, 1), (False, 0), ("0", 0), ("1", 1),
                                             (" Anomalous ", 1), ("normal", 0), (None, None)])
def test_accepted_label_forms(value, expected):
    assert parse_label(value) == expected
    assert Record(item_id="x", label_gt=value).label_gt == expected


@pytest.mark.parametrize("value", ["yes", 2, -1, 0.5, "2", "abnormal", [1], {"label": 1}, "", "nan"])
def test_labels_in_no_accepted_form_are_refused(value):
    with pytest.raises(ValueError, match="is not one of"):
        parse_label(value)
    with pytest.raises(ValueError):
        Record(item_id="x", label_gt=value)


@pytest.mark.parametrize("value, expected", [(0.25, 0.25), (1, 1.0), ("0.7", 0.7), (" 1e-2 ", 0.01), (None, None)])
def test_accepted_score_forms(value, expected):
    assert parse_score(value) == expected


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-Infinity", True, False, "high", [0.5], float("nan")])
def test_scores_in_no_accepted_form_are_refused(value):
    with pytest.raises(ValueError, match="not a number|not finite"):
        parse_score(value)


def test_bad_labels_and_scores_are_counted_per_field_and_file_and_never_crash(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [_released_row(i, i % 2) for i in range(10)]
    rows[0]["label_gt"] = "yes"
    rows[1]["label_gt"] = 2
    rows[2]["label_gt"] = "anomalous"  # accepted
    rows[3]["direct_score"] = "NaN"
    rows[4]["v9_score"] = "inf"
    rows[5]["direct_score"] = True
    rows[6]["direct_score"] = "0.61"  # accepted
    rows[7]["n_turns"] = "many"  # the wrong type for a non-score field: counted, read as the default
    (run / "D1.json").write_text(json.dumps(rows))
    (run / "D2.json").write_text(json.dumps([_released_row(i, i % 2, domain_code="D2", item_id=f"D2_{i}",
                                                           label_gt="yes" if i == 0 else i % 2) for i in range(4)]))
    code, last, out, err = _eval(capsys, str(run))
    assert code == 0
    d1, d2 = str(run / "D1.json"), str(run / "D2.json")
    assert last["invalid_values"] == {d1: {"label_gt": 2, "direct_score": 2, "v9_score": 1, "n_turns": 1},
                                      d2: {"label_gt": 1}}
    assert last["rows"] == 14 and last["kept"] == 14 - 6
    assert last["left_out"] == {"no label": 3, "no direct_score": 2, "no refute_score": 1}
    assert f"{d1}: 2 values of 'label_gt' not accepted, read as null (first: {d1}[0]: \"yes\")" in err
    assert f"{d1}: 2 values of 'direct_score' not accepted" in err and '"NaN"' in err
    assert "(6 of 14 rows left out: 3 no label, 2 no direct_score, 1 no refute_score)" in out
    assert {r.item_id: r.label_gt for r in read_records(run).records}["D1_0002"] == 1
    code, _, _, err = _eval(capsys, str(run), "--strict")
    assert code == 1


def test_labels_outside_0_1_never_reach_the_metric(tmp_path, capsys):
    rows = [_released_row(i, label) for i, label in enumerate([0, 1, 0, 1, 2, 3, -1])]
    (tmp_path / "D1.json").write_text(json.dumps(rows))
    code, last, _, _ = _eval(capsys, str(tmp_path))
    assert code == 0 and last["kept"] == 4 and last["per_domain"]["D1"]["n_anomalous"] == 2


def test_a_file_that_is_not_json_is_named_and_the_others_are_read(tmp_path, capsys):
    (tmp_path / "D1.json").write_text(json.dumps([_released_row(i, i % 2) for i in range(4)]))
    (tmp_path / "D2.json").write_text('[{"item_id": "D2_0001", ')
    code, last, _, err = _eval(capsys, str(tmp_path))
    assert code == 0 and last["kept"] == 4
    assert last["unreadable_files"][0]["path"] == str(tmp_path / "D2.json")
    assert f"cannot read {tmp_path / 'D2.json'}: not valid JSON" in err
    assert _eval(capsys, str(tmp_path), "--strict")[0] == 1


def test_a_run_folder_with_other_record_files_is_refused_unless_merged(tmp_path, capsys):
    ours = [Record(item_id=f"D1_{i:04d}", domain_code="D1", label_gt=i % 2, direct_score=0.9 * (i % 2),
                   refute_score=0.5) for i in range(4)]
    (tmp_path / RECORDS_FILE).write_text("".join(r.to_line() + "\n" for r in ours))
    (tmp_path / "D1.json").write_text(json.dumps([_released_row(i, i % 2) for i in range(2, 6)]))
    (tmp_path / "run_20260101.json").write_text("{}")  # a run summary is not a record file
    with pytest.raises(ValueError, match="mixes record files of different kinds") as info:
        record_files(tmp_path)
    assert "records.jsonl" in str(info.value) and "D1.json" in str(info.value) and "--merge" in str(info.value)
    assert main(["eval", str(tmp_path)]) == 2
    assert "mixes record files" in capsys.readouterr().err
    code, last, out, err = _eval(capsys, str(tmp_path), "--merge")
    assert code == 0 and [f["path"] for f in last["files"]] == [str(tmp_path / RECORDS_FILE), str(tmp_path / "D1.json")]
    assert last["rows"] == 8 and last["duplicates"] == 2 and last["kept"] == 6
    assert "2 records replaced by a later record of the same item (first: 'D1_0002'" in err
    assert f"read {tmp_path}: 2 files (records.jsonl, D1.json), 8 rows" in out
    # Naming one file reads only it.
    assert _eval(capsys, str(tmp_path / RECORDS_FILE))[1]["rows"] == 4


def test_a_run_folder_alone_and_a_released_folder_alone_are_read_as_before(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / RECORDS_FILE).write_text(Record(item_id="x").to_line() + "\n")
    assert record_files(tmp_path / "a") == [tmp_path / "a" / RECORDS_FILE]
    (tmp_path / "b").mkdir()
    for k in (10, 2, 1):
        (tmp_path / "b" / f"D{k}.json").write_text("[]")
    assert [f.name for f in record_files(tmp_path / "b")] == ["D1.json", "D2.json", "D10.json"]
