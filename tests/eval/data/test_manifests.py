"""Manifests: the released ones load; every kind of bad manifest is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalyclaw.errors import ManifestError, SelectionError
from anomalyclaw.eval.data.manifests import load_manifest, read_manifest, write_manifest


def test_released_full_manifest_by_split(reference_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(tmp_path))
    manifests = reference_dir / "manifests"
    test_items = load_manifest(manifests, split="test")
    assert len(test_items) == 1418
    assert len(load_manifest(manifests, split="calibration")) == 240
    assert len(load_manifest(manifests, split="dev")) == 480
    first = test_items[0]
    assert str(first.query_path).startswith(str(tmp_path.resolve()))
    assert first.domain_card.code == first.domain_code
    assert len(load_manifest(manifests, split="test", domains=["D7"])) == 98


def test_released_domain_file(reference_dir, tmp_path):
    items = load_manifest(reference_dir / "manifests" / "D7_remote_sensing_manifest.json", data_root=tmp_path)
    assert {it.domain_code for it in items} == {"D7"}
    assert all(len(it.ref_paths) == 1 for it in items)  # bi-temporal: the "before" image
    assert "bi_temporal" in items[0].traits


def test_unset_data_root_names_item_and_field(reference_dir):
    with pytest.raises(ManifestError) as err:
        load_manifest(reference_dir / "manifests" / "D1_industrial_manifest.json")
    msg = str(err.value)
    assert "ANOMALYCLAW_DATA" in msg and "query_path" in msg and "D1_" in msg


def _write(tmp_path: Path, items) -> Path:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(items))
    return p


def _item(i="a1", **kw):
    base = {"item_id": i, "domain_code": "X", "query_path": "q.png", "ref_paths": ["r.png"], "label": 0}
    base.update(kw)
    return base


@pytest.mark.parametrize("bad, field, words", [
    ({"label": 2}, "label", "0 (normal), 1 (anomalous)"),
    ({"label": "good"}, "label", "0 (normal)"),
    ({"ref_paths": []}, "ref_paths", "at least one"),
    ({"ref_paths": "r.png"}, "ref_paths", "list"),
    ({"query_path": ""}, "query_path", "non-empty"),
    ({"query_path": "{DATA_ROOT}/../../etc/passwd"}, "query_path", "escapes"),
    ({"domain_card": {"code": "X", "name": "x", "traits": ["shiny"]}}, "domain_card", "unknown traits"),
])
def test_bad_item_fields(tmp_path, monkeypatch, bad, field, words):
    (tmp_path / "data").mkdir()  # a data root that does not exist is one error of its own (issue 15)
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(tmp_path / "data"))
    path = _write(tmp_path, [_item("good"), _item("bad", **bad)])
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert "'bad'" in msg and f"field '{field}'" in msg and words in msg
    contents = read_manifest(path)  # the lenient reader keeps the good item
    assert [it.item_id for it in contents.items] == ["good"]
    assert "bad" in contents.rejected


def test_missing_field_and_duplicate_id(tmp_path):
    items = [_item("a"), {k: v for k, v in _item("b").items() if k != "label"}, _item("a")]
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, items))
    msg = str(err.value)
    assert "item 'b'" in msg and "field 'label': missing" in msg
    assert "item 'a' (#2)" in msg and "duplicate" in msg and "#0" in msg


def test_not_json_and_not_a_list(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(p)
    p.write_text('{"a": 1}')
    with pytest.raises(ManifestError, match="array of items"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "absent.json")
    with pytest.raises(SelectionError, match="no split named 'train': a split is one of calibration, dev, test"):
        load_manifest(_write(tmp_path, [_item()]), split="train")


def test_relative_paths_resolve_against_manifest_folder_and_round_trip(tmp_path):
    sub = tmp_path / "bench"
    sub.mkdir()
    path = sub / "manifest.json"
    path.write_text(json.dumps([_item("a", query_path="img/q.png", ref_paths=["img/r1.png", "img/r2.png"])]))
    (item,) = load_manifest(path)
    assert item.query_path == (sub / "img" / "q.png").resolve()
    out = write_manifest([item], tmp_path / "moved" / "manifest.json", relative_to=sub)
    row = json.loads(out.read_text())[0]
    assert row["query_path"] == "img/q.png" and row["ref_paths"] == ["img/r1.png", "img/r2.png"]


def test_domains_and_split_match_in_any_case_and_a_miss_lists_what_there_is(tmp_path):
    from anomalyclaw.errors import SelectionError

    rows = [_item("a", domain="industrial", domain_code="D1", split="test"),
            _item("b", domain="retail", domain_code="D5", split="dev")]
    path = _write(tmp_path, rows)
    assert [i.item_id for i in read_manifest(path, domains=["d1"]).items] == ["a"]
    assert [i.item_id for i in read_manifest(path, domains=["RETAIL"], split="Dev").items] == ["b"]
    with pytest.raises(SelectionError) as err:
        read_manifest(path, domains=["D1", "D13"])
    assert "no items in domain(s) D13" in str(err.value) and "D1 (industrial, 1 items), D5 (retail, 1 items)" in str(err.value)
    with pytest.raises(SelectionError, match=r"split calibration; its splits: test \(1 items\), dev \(1 items\)"):
        read_manifest(path, split="calibration")
    with pytest.raises(SelectionError, match="no items in domain.*D5.*with split test.*its domains: D1"):
        read_manifest(path, split="test", domains=["D5"])


def test_a_data_root_that_does_not_exist_is_one_error(tmp_path):
    rows = [_item(f"i{k}", query_path="{DATA_ROOT}/q.png", ref_paths=["{DATA_ROOT}/r.png"]) for k in range(4)]
    with pytest.raises(ManifestError) as err:
        read_manifest(_write(tmp_path, rows), data_root=tmp_path / "nowhere")
    assert len(err.value.problems) == 1
    assert f"the data root {tmp_path / 'nowhere'} is a folder that does not exist (4 items need it)" in str(err.value)
