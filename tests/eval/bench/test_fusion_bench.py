"""The MVTec-style folder drawn from other images, and the with/without-expert comparison."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from anomalyclaw.eval.bench.fusion import _compare, format_fusion
from anomalyclaw.eval.data.folders import import_mvtec_folder
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.eval.data.parts import CATEGORIES, DEFECTS, write_parts_folder
from anomalyclaw.eval.running.records import Record


def _digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()


def test_parts_folder_is_an_importable_mvtec_layout_with_masks_and_is_reproducible(tmp_path):
    root = write_parts_folder(tmp_path / "a", seed=3, n_train=3, n_test_good=2, n_per_defect=1, size=96)
    assert sorted(p.name for p in root.iterdir()) == sorted(CATEGORIES)
    items = load_manifest(import_mvtec_folder(root, tmp_path / "m.json", n_refs=2))
    assert len(items) == len(CATEGORIES) * (2 + 3)
    for it in items:
        assert len(it.ref_paths) == 2 and it.split == "test"
        if it.label:
            assert it.anomaly_type in DEFECTS[it.category] and it.mask_path is not None
            mask = cv2.imread(str(it.mask_path), cv2.IMREAD_GRAYSCALE)
            assert 0 < (mask > 0).mean() < 0.3  # the defect is marked, and it is local
        else:
            assert it.mask_path is None
    assert {it.category: sorted(it.traits) for it in items}["tile"] == ["texture"]  # an MVTec texture name
    same = write_parts_folder(tmp_path / "b", seed=3, n_train=3, n_test_good=2, n_per_defect=1, size=96)
    assert _digest(root) == _digest(same)
    assert _digest(root) != _digest(write_parts_folder(tmp_path / "c", seed=4, n_train=3, n_test_good=2,
                                                       n_per_defect=1, size=96))
    with pytest.raises(ValueError, match="unknown categories"):
        write_parts_folder(tmp_path / "d", categories=("gear",))


def test_with_and_without_the_expert_term_per_domain():
    recs = []
    for k in range(8):
        label = k % 2
        recs.append(Record(item_id=f"a{k}", domain_code="A", label_gt=label, direct_score=0.5, refute_score=0.5,
                           expert_score=0.5, expert_z={"anomaly_vfm": 2.0 * label - 1, "subspace_ad": 1.0 - 2 * label},
                           w_expert=0.2))
    out = _compare(recs, 0.2, 0.5)
    row = out["per_domain"]["A"]
    assert row["blend"] == 0.5 and row["fused"] == 0.5 and row["delta"] == 0.0  # the two experts cancel
    assert row["fused_anomaly_vfm"] == 1.0 and row["fused_subspace_ad"] == 0.0
    text = format_fusion({"weight": 0.2, "experts": ["anomaly_vfm", "subspace_ad"],
                          "benchmarks": {"synthetic": out}})
    assert "weight 0.2" in text and "+anomaly_vfm only" in text and np.isfinite(out["macro"]["fused"])
