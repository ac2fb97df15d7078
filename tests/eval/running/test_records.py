"""Records: one schema; durable appends; a torn tail is dropped and redone, never duplicated."""
from __future__ import annotations

import json
import math

from anomalyclaw.eval.running.records import (RECORDS_FILE, Record, RecordWriter, drop_error_records, finished_ids,
                                      load_records)


def test_released_record_maps_v9_to_refute(reference_dir):
    rows = json.loads((reference_dir / "results" / "released_qwen35vl27b" / "D1.json").read_text())
    rec = Record.model_validate(rows[0])
    assert rec.refute_score == rows[0]["v9_score"] == rec.v9_score
    assert rec.mcq_answer is None  # unknown released fields are kept


def test_writer_appends_flushes_and_round_trips(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write(Record(item_id="a", label_gt=1, direct_score=0.9, refute_score=0.7, anomaly_score=0.8))
        w.write(Record(item_id="b", error="image: cannot load image x.png: file is empty (0 bytes)"))
    lines = (tmp_path / RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 2
    recs = {r.item_id: r for r in load_records(tmp_path, strict=True)}
    assert recs["a"].v9_score == 0.7 and recs["b"].error.startswith("image:")


def test_nan_scores_become_null():
    rec = Record(item_id="x", direct_score=float("nan"), refute_score=math.inf)
    assert rec.direct_score is None and rec.refute_score is None
    json.loads(rec.to_line())  # strict JSON, no NaN tokens


def test_torn_tail_is_dropped_on_open_and_not_counted(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write(Record(item_id="a"))
    path = tmp_path / RECORDS_FILE
    with open(path, "a") as fh:
        fh.write('{"item_id": "b", "dire')  # a kill mid-write
    assert finished_ids(tmp_path) == {"a"}
    with RecordWriter(tmp_path) as w:
        w.write(Record(item_id="b"))
    assert [json.loads(line)["item_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_retry_errors_drops_only_error_records(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write(Record(item_id="a", direct_score=0.1))
        w.write(Record(item_id="b", error="VLM request failed"))
    assert drop_error_records(tmp_path) == 1
    assert finished_ids(tmp_path) == {"a"}


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    """Issue 17 item 2: the torn-tail repair removed a complete last record that lacked only its
    newline, while resume counted its item as done: the item vanished. Now it is kept."""
    with RecordWriter(tmp_path) as w:
        w.write(Record(item_id="a", direct_score=0.2))
        w.write(Record(item_id="b", direct_score=0.9))
    path = tmp_path / RECORDS_FILE
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # killed between the record and its newline
    assert finished_ids(tmp_path) == {"a", "b"}
    with RecordWriter(tmp_path) as w:  # what --resume does next
        w.write(Record(item_id="c"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == ["a", "b", "c"]
    assert {r.item_id: r.direct_score for r in load_records(tmp_path, strict=True)}["b"] == 0.9
    path.write_bytes(path.read_bytes() + b'{"item_id": "d", "direct_sc')   # a torn write is still dropped
    with RecordWriter(tmp_path):
        pass
    assert path.read_bytes().endswith(b"\n") and finished_ids(tmp_path) == {"a", "b", "c"}
