"""Readers of the released expert scores and retrieval indexes: on small files made here, and on
the real reference data when ../shared is present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomalyclaw.experts.released import ReleasedScoreCache, RetrievalIndex
from anomalyclaw.items import Item

SHARED = Path(__file__).resolve().parents[3] / "shared"
RELEASE = SHARED / "reference" / "crossdomainvad12"
needs_shared = pytest.mark.skipif(not RELEASE.is_dir(), reason="reference data (../shared) not present")


def _row(item_id: str, score: float, *, code: str = "D1", split: str = "test", label: int = 0,
         norm: float | None = None) -> dict:
    row = {"item_id": item_id, "domain": "industrial", "domain_code": code, "label_gt": label,
           "anomaly_score": score, "label_pred": int(score > 30), "error": None, "split": split,
           "top_patches": [{"rank": 1, "score": score + 5, "row": 3, "col": 4, "region": "upper-left"}]}
    if norm is not None:
        row["anomaly_score_norm"] = norm
    return row


@pytest.fixture
def cache_folder(tmp_path):
    folder = tmp_path / "expert_cache"
    folder.mkdir()
    (folder / "subspacead_test.json").write_text(json.dumps(
        [_row("D1_0001", 40.0, norm=0.9), _row("D3b_0002", 12.0, code="D3b", label=1)]))
    (folder / "subspacead_calibration.json").write_text(json.dumps([_row("D1_0100", 20.0, split="calibration")]))
    (folder / "anomalyvfm_test.json").write_text(json.dumps([_row("D1_0001", 0.4)]))
    (folder / "subspacead_thresholds.json").write_text(json.dumps({"D1": 38.5, "D3b": 46.8}))
    return folder


def test_cache_reads_present_files_and_lists_missing_ones(cache_folder):
    cache = ReleasedScoreCache.load(cache_folder)
    assert sorted(p.name for p in cache.sources) == ["anomalyvfm_test.json", "subspacead_calibration.json",
                                                      "subspacead_test.json"]
    assert sorted(cache.missing) == ["anomalyvfm_calibration.json", "anomalyvfm_dev.json", "subspacead_dev.json"]
    assert cache.ids("subspacead") == {"D1_0001", "D3b_0002", "D1_0100"}
    assert cache.ids("anomaly_vfm") == {"D1_0001"}  # tool-facing alias
    assert "D1_0100" in cache and "D9_9999" not in cache


def test_cache_get_returns_the_released_fields(cache_folder):
    cache = ReleasedScoreCache.load(cache_folder)
    subspace = cache.get("D1_0001", "subspace_ad")
    assert subspace["score"] == 40.0 and subspace["score_norm"] == 0.9
    assert subspace["threshold"] == 38.5 and subspace["label_pred"] == 1
    assert subspace["top_patches"][0]["row"] == 3
    vfm = cache.get("D1_0001", "anomalyvfm")
    assert vfm["score"] == 0.4 and vfm["score_norm"] is None and vfm["threshold"] is None
    assert cache.get("D1_0100", "anomalyvfm") is None
    assert cache.get("D3b_0002", "subspacead")["threshold"] == 46.8
    with pytest.raises(ValueError, match="unknown released expert"):
        cache.get("D1_0001", "patchcore")


def test_for_item_refuses_rows_of_a_different_question(cache_folder, tmp_path):
    cache = ReleasedScoreCache.load(cache_folder)

    def item(item_id, *, split="test", label=0, code="D1"):
        return Item(item_id=item_id, query_path=tmp_path / "q.png", ref_paths=(tmp_path / "r.png",),
                    domain_code=code, label=label, split=split)

    assert cache.for_item(item("D1_0001"), "subspacead")["score"] == 40.0
    assert cache.for_item(item("D1_0001", label=1), "subspacead") is None
    assert cache.for_item(item("D1_0001", split="dev"), "subspacead") is None
    assert cache.for_item(item("D1_0001", code="D2"), "subspacead") is None
    assert cache.for_item(item("D1_0001", label=None), "anomalyvfm")["score"] == 0.4


def test_cache_errors_name_the_folder_or_file(tmp_path, cache_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReleasedScoreCache.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no expert cache files"):
        ReleasedScoreCache.load(tmp_path / "empty")
    (cache_folder / "subspacead_dev.json").write_text("{not json")
    with pytest.raises(ValueError, match="subspacead_dev.json: not valid JSON"):
        ReleasedScoreCache.load(cache_folder)
    (cache_folder / "subspacead_dev.json").write_text(json.dumps([{"score": 1}]))
    with pytest.raises(ValueError, match="record #0 has no string 'item_id'"):
        ReleasedScoreCache.load(cache_folder)


def _index_file(tmp_path, embeddings, paths=None, name="D1_index.npz"):
    path = tmp_path / name
    arrays = {"embeddings": np.asarray(embeddings, np.float32)}
    if paths is not None:
        arrays["paths"] = np.asarray(paths)
    np.savez(path, **arrays)
    return path


def test_retrieval_index_returns_nearest_by_cosine(tmp_path):
    embeddings = [[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]]
    index = RetrievalIndex.load(_index_file(tmp_path, embeddings, [f"/data/ref_{i}.png" for i in range(4)]))
    assert len(index) == 4 and index.dim == 3
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1.0)
    hits = index.nearest(np.array([2.0, 0.1, 0.0]), k=2)
    assert [h[0] for h in hits] == [0, 2]
    assert hits[0][1] == pytest.approx(2.0 / np.hypot(2.0, 0.1), rel=1e-5)
    assert hits[0][2] == "/data/ref_0.png"
    assert len(index.nearest(np.ones(3), k=10)) == 4


def test_retrieval_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        RetrievalIndex.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match=r"missing array\(s\) \['paths'\]"):
        RetrievalIndex.load(_index_file(tmp_path, np.eye(3)))
    with pytest.raises(ValueError, match=r"embeddings \[N, D\] and paths \[N\]"):
        RetrievalIndex.load(_index_file(tmp_path, np.eye(3), ["a", "b"], name="bad.npz"))
    index = RetrievalIndex.load(_index_file(tmp_path, np.eye(3), ["a", "b", "c"], name="ok.npz"))
    with pytest.raises(ValueError, match="4 dimensions but the index has 3"):
        index.nearest(np.ones(4))
    with pytest.raises(ValueError, match="all zeros"):
        index.nearest(np.zeros(3))


# ------------------------------------------------------------------------------ released files

@needs_shared
def test_released_cache_coverage_and_values():
    cache = ReleasedScoreCache.load(RELEASE / "expert_cache")
    assert cache.missing == ["anomalyvfm_dev.json"]  # the release has no AnomalyVFM dev file
    assert len(cache.ids("subspacead")) == 1958 and len(cache.ids("anomalyvfm")) == 1518
    row = cache.get("D1_0063", "subspacead")
    assert row["score"] == pytest.approx(17.94591248553732)
    assert row["score_norm"] == pytest.approx(0.7938258685128609)
    assert row["threshold"] == pytest.approx(38.61791652181874)
    assert row["top_patches"][0] == {"rank": 1, "score": pytest.approx(32.97615432739258), "row": 22,
                                     "col": 24, "region": "center"}
    vfm = cache.get("D1_0079", "anomalyvfm")
    assert vfm["score"] == pytest.approx(0.318359375) and vfm["split"] == "calibration"
    # Old-revision ids exist in the cache but in no current manifest.
    assert any(i.startswith("D3b_") for i in cache.ids("subspacead"))


@needs_shared
def test_released_cache_matches_687_test_ids_of_which_678_agree(tmp_path):
    from anomalyclaw.eval.data.manifests import load_manifest

    cache = ReleasedScoreCache.load(RELEASE / "expert_cache")
    test_items = load_manifest(RELEASE / "manifests" / "full_manifest.json", split="test", data_root=tmp_path)
    assert len(test_items) == 1418
    for expert in ("subspacead", "anomalyvfm"):
        test_rows = {i for i, row in cache.entries[expert].items() if row["split"] == "test"}
        assert len(test_rows & {it.item_id for it in test_items}) == 687
        agreeing = [it for it in test_items if cache.for_item(it, expert) is not None]
        assert len(agreeing) == 678


@needs_shared
def test_released_retrieval_index():
    index = RetrievalIndex.load(RELEASE / "retrieval_index" / "D1_index.npz")
    assert len(index) == 150 and index.dim == 384
    hits = index.nearest(index.embeddings[5], k=3)
    assert hits[0][0] == 5 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][2].endswith(".png") and "MVTec-AD" in hits[0][2]
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
