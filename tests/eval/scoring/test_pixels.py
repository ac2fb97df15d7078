"""Pixel metrics: AUPRO checked against a case computed by hand, pixel AUROC, box hits."""
from __future__ import annotations

import numpy as np
import pytest

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.pixels import area_to, aupro, best_box_hits, pixel_auroc, pro_curve

# Two 1 x 4 "images". A: a 2-pixel region; B: a 1-pixel region; five normal pixels in all.
MASKS = [np.array([[1, 1, 0, 0]], bool), np.array([[0, 0, 0, 1]], bool)]
MAPS = [np.array([[0.9, 0.4, 0.5, 0.1]]), np.array([[0.2, 0.3, 0.6, 0.7]])]


def test_aupro_matches_the_hand_computed_case():
    """Thresholds from the top: 0.9 finds half of region A (overlap 0.25, FPR 0); 0.7 all of
    region B (0.75, 0); 0.6 and 0.5 are normal (FPR 0.2, 0.4); 0.4 completes A (1.0 at 0.4).
    Area to 0.3: 0.75 * 0.3 = 0.225, normalised 0.75. Area to 0.5: 0.75 * 0.4 + 1.0 * 0.1 = 0.4,
    normalised 0.8."""
    fpr, pro = pro_curve(MASKS, MAPS)
    assert fpr.tolist() == pytest.approx([0, 0, 0, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0])
    assert pro.tolist() == pytest.approx([0, 0.25, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0])
    assert aupro(MASKS, MAPS) == pytest.approx(0.75)
    assert aupro(MASKS, MAPS, limit=0.5) == pytest.approx(0.8)
    assert aupro(MASKS, MAPS, limit=0.1) == pytest.approx(0.75)   # interpolated inside a flat segment
    # Pixel AUROC of the same pixels: 13 of the 15 (anomalous, normal) pairs are ordered right.
    assert pixel_auroc(MASKS, MAPS) == pytest.approx(13 / 15)


def test_aupro_counts_regions_not_pixels_and_handles_ties():
    # One big region found, one small region missed: the overlap averages regions, so 0.5.
    mask = np.zeros((10, 10), bool)
    mask[0:5, 0:5] = True          # 25 px, found
    mask[9, 9] = True              # 1 px, missed (scores like the normal pixels)
    amap = np.zeros((10, 10))
    amap[0:5, 0:5] = 1.0
    fpr, pro = pro_curve([mask], [amap])
    assert fpr.tolist() == pytest.approx([0, 0, 1]) and pro.tolist() == pytest.approx([0, 0.5, 1])
    # From (0, 0.5) straight to (1, 1): at FPR 0.3 the overlap is 0.65; area (0.5 + 0.65) / 2 * 0.3.
    assert aupro([mask], [amap]) == pytest.approx((0.5 + 0.65) / 2)
    # A constant map is one threshold: the diagonal, area 0.045 to 0.3, normalised 0.15.
    assert aupro([mask], [np.zeros((10, 10))]) == pytest.approx(0.15)
    assert aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert np.isnan(aupro([np.zeros((4, 4), bool)], [np.zeros((4, 4))]))    # no region
    assert np.isnan(aupro([np.ones((4, 4), bool)], [np.zeros((4, 4))]))     # no normal pixel
    with pytest.raises(ValueError, match="limit"):
        area_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.0)


def test_aupro_random_map_is_near_chance_and_8_connectivity_joins_diagonals():
    rng = np.random.default_rng(0)
    masks = [rng.random((64, 64)) > 0.97 for _ in range(4)]
    maps = [rng.random((64, 64)) for _ in range(4)]
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.03)
    diagonal = np.eye(3, dtype=bool)   # one region under 8-connectivity: finding one pixel is a third
    amap = np.zeros((3, 3))
    amap[0, 0] = 1.0
    fpr, pro = pro_curve([diagonal], [amap])
    assert pro[1] == pytest.approx(1 / 3)


def test_box_hits_use_the_best_confirmed_box():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True
    loc = {"boxes": [{"bbox": [0.5, 0.5, 0.9, 0.9], "score": 0.4}, {"bbox": [0.05, 0.05, 0.15, 0.15], "score": 0.9}]}
    assert best_box_hits(Record(item_id="a", localization=loc), mask)
    loc["boxes"][0]["score"] = 0.95
    assert not best_box_hits(Record(item_id="a", localization=loc), mask)
    assert not best_box_hits(Record(item_id="b", localization={"boxes": []}), mask)
    assert not best_box_hits(Record(item_id="c", localization={"boxes": [{"bbox": "junk", "score": 1}]}), mask)
