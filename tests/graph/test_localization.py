"""The agent's anomaly map: the fusion rule term by term, and the pipeline's localize step."""
from __future__ import annotations

import math

import numpy as np
import pytest

from anomalyclaw.graph.localization import (DEFAULT_RULE, WHOLE_IMAGE, LocalizationInputs, LocalizationRule, Region,
                                            box_mask, expert_map, fuse_log_odds, fuse_map, valid_bbox)
from anomalyclaw.graph.localize import decode_map, encode_map

SHAPE = (40, 60)
RULE = LocalizationRule(slope=1.0, confirm_gain=2.0, refute_gain=1.5, refute_whole_gain=3.0, mask_gain=4.0,
                        direct_gain=0.5, item_gain=1.0)


def _excess() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 2.0, SHAPE).astype(np.float32)


def test_box_mask_covers_the_box_and_at_least_one_pixel():
    m = box_mask([0.25, 0.5, 0.5, 1.0], SHAPE)
    assert m.sum() == 20 * 15 and m[20:40, 15:30].all()
    assert box_mask([0.999, 0.999, 1.0, 1.0], SHAPE).sum() == 1
    assert valid_bbox([0.1, 0.1, 0.2, 0.2]) == (0.1, 0.1, 0.2, 0.2)
    for bad in (None, [0.2, 0.1, 0.1, 0.2], [0, 0, 1], [0, 0, 1.5, 1], ["a", 0, 1, 1], [True, 0, 1, 1], [0, 0, math.nan, 1]):
        assert valid_bbox(bad) is None


def test_without_agent_evidence_the_map_is_a_monotone_transform_of_the_expert_map():
    excess = _excess()
    logits = fuse_log_odds(LocalizationInputs(excess), RULE)
    assert np.allclose(logits, excess - 1.0)                     # the same pixel ranking as E
    plain = fuse_map(LocalizationInputs(excess), RULE)
    assert plain[excess == excess.max()].item() == plain.max() and 0.0 < plain.min() and plain.max() < 1.0
    assert fuse_map(LocalizationInputs(np.full(SHAPE, 1.0, np.float32)), RULE) == pytest.approx(np.full(SHAPE, 0.5))
    # The expert's baseline map: its raw values through one fixed monotone transform.
    raw = np.array([[0.0, 0.5, 1.0, 3.0, -1.0, np.nan]])
    assert expert_map(raw)[0].tolist() == pytest.approx([0.0, 1 / 3, 0.5, 0.75, 0.0, 0.0])


def test_each_term_moves_exactly_its_pixels_by_its_gain():
    excess = _excess()
    base = fuse_log_odds(LocalizationInputs(excess), RULE)
    box = [0.0, 0.0, 0.5, 0.5]
    inside = box_mask(box, SHAPE)

    confirmed = fuse_log_odds(LocalizationInputs(excess, [Region(tuple(box), "confirmed")]), RULE) - base
    assert np.allclose(confirmed[inside], 2.0) and np.allclose(confirmed[~inside], 0.0)
    refuted = fuse_log_odds(LocalizationInputs(excess, [Region(tuple(box), "refuted")]), RULE) - base
    assert np.allclose(refuted[inside], -1.5) and np.allclose(refuted[~inside], 0.0)
    # Open and uncertain boxes do not move the map.
    undecided = [Region(tuple(box), "open"), Region(tuple(box), "uncertain")]
    assert np.allclose(fuse_log_odds(LocalizationInputs(excess, undecided), RULE), base)
    # Confirmed wins where a refuted box overlaps it; a refuted whole image lowers all but the confirmed box.
    both = [Region(tuple(box), "confirmed"), Region((0.25, 0.0, 1.0, 1.0), "refuted"), Region(WHOLE_IMAGE, "refuted")]
    d = fuse_log_odds(LocalizationInputs(excess, both), RULE) - base
    assert np.allclose(d[inside], 2.0)
    assert np.allclose(d[~inside & box_mask([0.25, 0.0, 1.0, 1.0], SHAPE)], -1.5 - 3.0)
    assert np.allclose(d[~inside & ~box_mask([0.25, 0.0, 1.0, 1.0], SHAPE)], -3.0)
    # Tool masks: the per-pixel max of the masks, times the gain; never lower.
    m1, m2 = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    m1[5, 5], m2[5, 5], m2[30, 50] = 0.5, 0.25, 1.0
    d = fuse_log_odds(LocalizationInputs(excess, tool_masks=[m1, m2]), RULE) - base
    assert d[5, 5] == pytest.approx(2.0) and d[30, 50] == pytest.approx(4.0) and d.min() == pytest.approx(0.0)
    # The direct branch's box, and the item's score as a whole-map offset.
    d = fuse_log_odds(LocalizationInputs(excess, direct_bbox=box), RULE) - base
    assert np.allclose(d[inside], 0.5) and np.allclose(d[~inside], 0.0)
    d = fuse_log_odds(LocalizationInputs(excess, item_score=0.9), RULE) - base
    assert np.allclose(d, math.log(9.0))
    assert np.isfinite(fuse_log_odds(LocalizationInputs(excess, item_score=1.0), RULE)).all()
    with pytest.raises(ValueError, match="shape"):
        fuse_log_odds(LocalizationInputs(excess, tool_masks=[np.zeros((3, 3))]), RULE)


def test_a_confirmed_box_on_the_defect_raises_its_ranking():
    """A weak defect the expert barely sees rises above a normal hotspot once confirmed."""
    excess = np.zeros(SHAPE, np.float32)
    excess[5:10, 5:10] = 1.2       # the defect, faint in the expert's map
    excess[30:35, 40:45] = 1.8     # a normal hotspot
    plain = fuse_map(LocalizationInputs(excess), DEFAULT_RULE)
    assert plain[7, 7] < plain[32, 42]
    found = fuse_map(LocalizationInputs(excess, [Region((5 / 60, 5 / 40, 10 / 60, 10 / 40), "confirmed"),
                                                 Region((40 / 60, 30 / 40, 45 / 60, 35 / 40), "refuted")]),
                     DEFAULT_RULE)
    assert found[7, 7] > found[32, 42]
    assert 0.0 < found.min() and found.max() < 1.0


def test_map_png_round_trip_keeps_16_bits():
    values = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    data = encode_map(values)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_map(data)
    assert back.shape == values.shape and np.abs(back - values).max() <= 0.5 / 65535 + 1e-7
    assert len(np.unique(back)) == values.size            # no ties introduced
    with pytest.raises(ValueError):
        decode_map(b"not a png")
