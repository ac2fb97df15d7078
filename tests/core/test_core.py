"""The core's shared pieces: the one LRU cache, score arithmetic, portable paths."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from anomalyclaw.cache import LRUCache, approx_nbytes, cache_stats, clear_caches
from anomalyclaw.paths import portable_path
from anomalyclaw.scores import clamp01, fuse, logistic, logit


def test_lru_evicts_the_least_recently_used_entry():
    cache = LRUCache("test.items", max_items=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1          # a is now the most recent
    cache.put("c", 3)                   # evicts b
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    stats = cache.stats()
    assert (stats["items"], stats["evictions"], stats["hits"]) == (2, 1, 3)
    assert cache.get("b", "gone") == "gone" and cache.stats()["misses"] == 1


def test_lru_bounds_bytes_and_skips_values_larger_than_the_budget():
    block = np.zeros(1000, np.uint8)
    cache = LRUCache("test.bytes", max_bytes=2500)
    for key in "abc":
        cache.put(key, block.copy())
    assert len(cache) == 2 and cache.stats()["bytes"] == 2000
    cache.put("huge", np.zeros(5000, np.uint8))
    assert "huge" not in cache and len(cache) == 2
    assert approx_nbytes((block, [block, b"xy"], {"k": "abc"})) == 2005


def test_get_or_compute_computes_once_for_concurrent_callers():
    cache = LRUCache("test.flight", max_items=4)
    calls = []

    def slow() -> str:
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return "value"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["value"] * 8 and len(calls) == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 7


def test_a_failed_computation_lets_the_next_caller_compute():
    cache = LRUCache("test.fail", max_items=4)

    def broken() -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", broken)
    assert cache.get_or_compute("k", lambda: 5) == 5


def test_a_nested_request_for_the_same_key_does_not_deadlock():
    cache = LRUCache("test.nested", max_items=4)
    assert cache.get_or_compute("k", lambda: cache.get_or_compute("k", lambda: 1) + 1) == 2


def test_every_cache_reports_and_clears_by_name():
    a = LRUCache("test.shared", max_items=4)
    b = LRUCache("test.shared", max_items=4)
    a.put(1, "x")
    b.put(2, "y")
    assert cache_stats()["test.shared"]["items"] == 2
    clear_caches()
    assert len(a) == len(b) == 0


def test_scores():
    assert clamp01(1.5) == 1.0 and clamp01(float("nan")) is None and clamp01(None) is None
    assert logistic(0.0) == 0.5 and logistic(1e9) == pytest.approx(1.0) and logistic(-1e9) >= 0.0
    assert logistic(logit(0.3)) == pytest.approx(0.3)
    assert math.isfinite(logit(0.0)) and math.isfinite(logit(1.0))
    assert fuse(0.2, 0.6) == pytest.approx(0.4)
    assert fuse(None, 0.6) == 0.6 and fuse(None, None) is None
    assert fuse(0.2, 0.6, expert=1.0, expert_weight=0.5) == pytest.approx((0.4 + 2.0) / 3.0)


def test_expert_term_is_bounded_exact_at_zero_and_ranks_like_the_additive_z_form():
    rng = np.random.default_rng(0)
    blend = rng.choice([0.035, 0.05, 0.5, 0.935, 0.95, 0.965], size=400)  # coarse, as VLM scores are
    z = rng.normal(0, 1.5, size=400)
    for w in (0.0, 0.05, 0.2, 0.5, 3.0):
        fused = np.array([fuse(b, b, expert=logistic(zi), expert_weight=w) for b, zi in zip(blend, z)])
        assert ((0 <= fused) & (fused <= 1)).all()
        additive = blend + w * 2 * np.tanh(z / 2)  # the soft-bounded additive form ranks the same
        assert (np.argsort(fused, kind="stable") == np.argsort(additive, kind="stable")).all()
    assert [fuse(b, b, expert=0.99, expert_weight=0) for b in blend[:20]] == list(blend[:20])  # exactly the blend
    # A missing expert is a typical one: the blend's place in the ranking, on the same scale.
    assert fuse(0.5, 0.5, expert=None, expert_weight=0.2) == fuse(0.5, 0.5, expert=0.5, expert_weight=0.2)
    assert fuse(None, None, expert=0.7, expert_weight=0.2) == 0.7 and fuse(None, None, expert_weight=0.2) is None
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="expert weight"):
            fuse(0.5, 0.5, expert=0.5, expert_weight=bad)


def test_portable_path(tmp_path):
    data = tmp_path / "data"
    manifest_dir = tmp_path / "m"
    assert portable_path(manifest_dir / "a" / "b.png", base=manifest_dir) == "a/b.png"
    assert portable_path(data / "x.png", base=manifest_dir, data_root=data) == "{DATA_ROOT}/x.png"
    assert portable_path("{DATA_ROOT}/y.png", base=manifest_dir) == "{DATA_ROOT}/y.png"
    elsewhere = tmp_path / "other.png"
    assert portable_path(elsewhere, base=manifest_dir, data_root=data) == str(elsewhere)


# ---------------------------------------------------------------------------- view downscaling

@pytest.mark.parametrize("shape,size", [((512, 512, 3), (240, 240)), ((512, 512, 3), (150, 150)),
                                        ((375, 500, 3), (384, 288)), ((512, 512), (170, 170)),
                                        ((300, 200, 3), (199, 299))])
def test_shrink_for_view_gives_the_size_asked_and_stays_close_to_an_area_resize(shape, size):
    import cv2

    from anomalyclaw.imaging import shrink_for_view

    rng = np.random.default_rng(0)
    # a smooth picture with an edge (what panels show), plus a little noise
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = (128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + 40 * (xx > shape[1] // 2)).clip(0, 255)
    img = (base[..., None] if len(shape) == 3 else base).repeat(shape[2] if len(shape) == 3 else 1, axis=-1)
    img = (img.reshape(shape) + rng.normal(0, 3, shape)).clip(0, 255).astype(np.uint8)
    out = shrink_for_view(img, size)
    assert out.shape[:2] == (size[1], size[0]) and out.dtype == np.uint8 and out.ndim == img.ndim
    area = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(float) - area).mean() < 4.0


def test_view_longest_shrinks_the_longer_side_and_never_upscales():
    from anomalyclaw.imaging import view_longest

    wide = np.zeros((400, 1000, 3), np.uint8)
    assert view_longest(wide, 768).shape == (307, 768, 3)
    small = np.zeros((100, 50, 3), np.uint8)
    assert view_longest(small, 768) is small


def test_finite_or_zero_is_nan_to_num_with_zeros_and_leaves_its_input_alone():
    from anomalyclaw.imaging import finite_or_zero

    values = np.array([[0.5, np.nan, np.inf], [-np.inf, -2.0, 3.0]], np.float64)
    out = finite_or_zero(values)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))
    assert np.isnan(values[0, 1])  # a copy, also where every value is finite:
    finite = np.ones((2, 2), np.float32)
    finite_or_zero(finite)[0, 0] = 7.0
    assert finite[0, 0] == 1.0
