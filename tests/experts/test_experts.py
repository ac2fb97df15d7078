"""Experts, the expert pool and the map helpers, on small images made here with drawn defects."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from anomalyclaw.experts import (ClassicBackbone, ExpertPool, PatchKNNExpert, SubspaceExpert, normalize_map,
                                 overlay_heatmap, suggest_bbox, top_regions)
from anomalyclaw.experts.patchknn import Bank, nearest_distances, pair_nearest, positional_distances

EXPERT_CLASSES = (PatchKNNExpert, SubspaceExpert)


def _surface(seed: int) -> np.ndarray:
    """A 512 px woven-looking surface (stripes plus blurred grain); normal images are crops."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:512, 0:512].astype(np.float32)
    stripes = 18 * np.sin(x / 3.0) * np.sin(y / 5.0)
    grain = cv2.GaussianBlur(rng.normal(0, 30, (512, 512)).astype(np.float32), (0, 0), 1.5)
    grey = 120 + stripes + grain
    return np.clip(np.stack([grey * 1.05, grey * 0.95, grey * 0.8], axis=-1), 0, 255).astype(np.uint8)


SURFACE = _surface(0)


def normal_image(seed: int, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, SURFACE.shape[0] - size, 2)
    crop = SURFACE[y0:y0 + size, x0:x0 + size].astype(np.float32)
    noise = rng.normal(0, 3, crop.shape)
    return np.clip(crop * rng.uniform(0.95, 1.05) + noise, 0, 255).astype(np.uint8)


def defective_image(seed: int, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A normal image with a dark scratch or a blue stain, and its defect mask."""
    rng = np.random.default_rng(10_000 + seed)
    image = normal_image(seed, size)
    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(v) for v in rng.integers(40, size - 40, 2))
    if seed % 2:
        angle = rng.uniform(0, np.pi)
        dx, dy = int(30 * np.cos(angle)), int(30 * np.sin(angle))
        cv2.line(image, (cx - dx, cy - dy), (cx + dx, cy + dy), (25, 25, 25), 3)
        cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 1, 3)
    else:
        cv2.circle(image, (cx, cy), 11, (60, 90, 170), -1)
        cv2.circle(mask, (cx, cy), 11, 1, -1)
    return image, mask.astype(bool)


@pytest.fixture(scope="module")
def backbone():
    return ClassicBackbone()


@pytest.fixture(scope="module")
def references():
    return [normal_image(s) for s in range(4)]


# ------------------------------------------------------------------------------------- results

@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_result_shapes_types_and_calibration(expert_class, backbone, references):
    expert = expert_class(backbone).fit(references)
    query = normal_image(99)[:150, :, :]  # not square: the map must follow the query's own size
    result = expert.score(query)
    assert result.expert == expert_class.name
    assert result.anomaly_map.shape == (150, 192) and result.anomaly_map.dtype == np.float32
    assert result.patch_map.shape == backbone.grid and result.patch_map.dtype == np.float32
    assert result.reference_scores.shape == (4,) and result.reference_scores.dtype == np.float32
    assert 0.0 <= result.rank <= 1.0
    assert result.threshold == pytest.approx(float(result.reference_scores.max()))
    assert result.rank == pytest.approx(float(np.mean(result.reference_scores < result.score)))
    assert result.elapsed_s > 0
    low, high = result.normal_range
    assert low < high == pytest.approx(result.threshold)
    summary = result.summary()
    json.dumps(summary)
    assert summary["n_references"] == 4 and 0 <= summary["peak_xy"][0] <= 1


@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_fit_and_score_are_deterministic(expert_class, backbone, references):
    query, _ = defective_image(1)
    first = expert_class(backbone).fit(references).score(query)
    second = expert_class(backbone).fit(references).score(query)
    assert first.score == second.score
    assert np.array_equal(first.anomaly_map, second.anomaly_map)
    assert np.array_equal(first.reference_scores, second.reference_scores)


@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_drawn_defects_score_higher_than_normal_images(expert_class, backbone, references):
    expert = expert_class(backbone).fit(references)
    normal_scores = [expert.score(normal_image(100 + s)).score for s in range(8)]
    defect_scores = [expert.score(defective_image(s)[0]).score for s in range(8)]
    auroc = roc_auc_score([0] * 8 + [1] * 8, normal_scores + defect_scores)
    assert auroc >= 0.95, (expert_class.name, auroc)


@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_anomaly_map_peaks_on_the_defect(expert_class, backbone, references):
    expert = expert_class(backbone).fit(references)
    hits = 0
    for seed in range(6):
        query, mask = defective_image(seed)
        result = expert.score(query)
        peak = np.unravel_index(int(np.argmax(result.anomaly_map)), mask.shape)
        near_defect = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        hits += bool(near_defect[peak])
        assert roc_auc_score(mask.ravel(), result.anomaly_map.ravel()) > 0.9
    assert hits == 6


def test_obvious_defect_ranks_above_every_reference(backbone, references):
    query, _ = defective_image(2)
    for expert_class in EXPERT_CLASSES:
        result = expert_class(backbone).fit(references).score(query)
        assert result.rank == 1.0 and result.above_threshold


def test_a_reference_scored_against_its_own_bank_is_perfectly_normal(backbone, references):
    result = PatchKNNExpert(backbone).fit(references).score(references[0])
    # Not exactly 0: float32 cancellation in |q|^2 + |b|^2 - 2 q.b; normal patches score ~1.
    assert result.score == pytest.approx(0.0, abs=0.02)
    assert result.rank == 0.0


@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_a_single_reference_is_calibrated_by_held_out_quadrants(expert_class, backbone):
    expert = expert_class(backbone).fit([normal_image(0)])
    assert expert.reference_scores_.shape == (1,) and expert.reference_scores_[0] > 0
    result = expert.score(defective_image(0)[0])
    assert result.rank in (0.0, 1.0)
    assert result.score > expert.reference_scores_[0]


# --------------------------------------------------------------------------- leave-one-out maths

def test_knn_held_out_scores_match_a_brute_force_search(backbone, references):
    features = backbone.patch_features(references[:3])
    expert = PatchKNNExpert(backbone, k=2).fit_features(features, backbone=backbone)
    flat = features.reshape(3, -1, features.shape[-1])
    for r in range(3):
        others = np.concatenate([flat[i] for i in range(3) if i != r])
        distances, _ = NearestNeighbors(n_neighbors=2).fit(others).kneighbors(flat[r])
        assert np.allclose(expert.reference_patch_maps_[r].ravel(), distances.mean(axis=1), atol=1e-3)


def test_subspace_held_out_scores_refit_without_the_held_out_image(backbone, references):
    features = backbone.patch_features(references[:3])
    expert = SubspaceExpert(backbone, n_components=5).fit_features(features, backbone=backbone)
    from sklearn.decomposition import PCA

    flat = features.reshape(3, -1, features.shape[-1])
    pca = PCA(n_components=5).fit(np.concatenate([flat[1], flat[2]]))
    residual = flat[0] - pca.inverse_transform(pca.transform(flat[0]))
    assert np.allclose(expert.reference_patch_maps_[0].ravel(), (residual ** 2).sum(axis=1), rtol=1e-3, atol=1e-3)
    assert expert.n_components_ == 5


def test_nearest_distances_match_scikit_learn():
    rng = np.random.default_rng(0)
    query, bank = rng.normal(size=(300, 12)).astype(np.float32), rng.normal(size=(500, 12)).astype(np.float32)
    for k in (1, 3):
        expected, _ = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(query)
        assert np.allclose(nearest_distances(query, bank, k), expected.mean(axis=1), atol=1e-4)
        # The bank in blocks (uneven, smaller than k, one per row) gives the one-block distances.
        whole = nearest_distances(query, bank, k, bank_tile=None)
        for tile in (128, 77, 2, 1, 499, 5000):
            assert np.allclose(nearest_distances(query, bank, k, bank_tile=tile), whole, rtol=0, atol=1e-6), tile
        # A prepared Bank, as a fitted expert keeps it across queries, gives the same numbers.
        for tile in (None, 128):
            prepared = Bank(bank, bank_tile=tile, k=k)
            assert np.array_equal(nearest_distances(query, prepared, k), nearest_distances(query, bank, k, bank_tile=tile))


def test_distance_blocks_reuse_one_buffer_per_thread_and_give_the_same_numbers(monkeypatch):
    """Each thread computes its distance blocks into one buffer of its own (a fresh 2 MB block
    per product cost ~460 page faults); the numbers are those of freshly allocated blocks."""
    from anomalyclaw.experts import patchknn

    rng = np.random.default_rng(1)
    query, bank = rng.normal(size=(600, 16)).astype(np.float32), rng.normal(size=(900, 16)).astype(np.float32)
    a, b = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(200, 16)).astype(np.float32)

    def run() -> tuple[np.ndarray, ...]:
        return (nearest_distances(query, bank, 1, bank_tile=256), nearest_distances(query, bank, 3, bank_tile=None),
                *pair_nearest(a, b, 2))

    reused = run()
    storage = patchknn._BLOCKS.buf.data_ptr()
    assert all(np.array_equal(x, y) for x, y in zip(run(), reused)) and patchknn._BLOCKS.buf.data_ptr() == storage
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(results=run(), storage=patchknn._BLOCKS.buf.data_ptr()))
    worker.start()
    worker.join()
    assert seen["storage"] != storage  # its own buffer
    assert all(np.array_equal(x, y) for x, y in zip(seen["results"], reused))
    monkeypatch.setattr(patchknn, "_block_out", lambda rows, cols, device: None)  # fresh blocks, as before
    assert all(np.array_equal(x, y) for x, y in zip(run(), reused))


def test_a_fitted_patch_knn_builds_its_search_bank_once_and_a_refit_replaces_it():
    rng = np.random.default_rng(2)
    references = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(3)]
    expert = PatchKNNExpert(ClassicBackbone(work_size=64)).fit(references)
    query = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    first = expert.score(query)
    bank = expert.search_bank_
    assert bank is not None and expert.score(query).score == first.score and expert.search_bank_ is bank
    expert.fit(references[:2])
    assert expert.search_bank_ is None and expert.score(query).score != first.score


def test_positional_search_with_a_wide_radius_is_the_free_search():
    rng = np.random.default_rng(1)
    query, references = rng.normal(size=(5, 6, 4)).astype(np.float32), rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
    free = nearest_distances(query.reshape(-1, 4), references.reshape(-1, 4)).reshape(5, 6)
    assert np.allclose(positional_distances(query, references, radius=6), free, atol=1e-4)
    # Radius 0: only the same cell of each reference.
    same_cell = np.sqrt(((references - query[None]) ** 2).sum(-1)).min(axis=0)
    assert np.allclose(positional_distances(query, references, radius=0), same_cell, atol=1e-4)


def _dot_tray(missing: int | None = None, seed: int = 0) -> np.ndarray:
    """A 3 x 3 tray of dark dots on a light board, slightly shifted per image."""
    rng = np.random.default_rng(seed)
    image = np.full((192, 192, 3), 215, np.uint8)
    dy, dx = rng.integers(-3, 4, 2)
    for i in range(9):
        if i != missing:
            cv2.circle(image, (int(40 + 56 * (i % 3) + dx), int(40 + 56 * (i // 3) + dy)), 14, (40, 40, 40), -1)
    return np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)


def test_positional_search_finds_a_missing_part_the_free_search_cannot(backbone):
    """A missing dot leaves plain board, which exists elsewhere: only position tells it apart."""
    references = [_dot_tray(seed=s) for s in range(4)]
    queries = [_dot_tray(seed=10 + s) for s in range(4)] + [_dot_tray(missing=s, seed=20 + s) for s in range(4)]
    labels = [0] * 4 + [1] * 4
    free = PatchKNNExpert(backbone).fit(references)
    # Radius 1 cell (8 px): the board 16 px from a dot centre lies beyond its 14 px rim.
    positional = PatchKNNExpert(backbone, positional_radius=1).fit(references)
    free_auroc = roc_auc_score(labels, [free.score(q).score for q in queries])
    positional_auroc = roc_auc_score(labels, [positional.score(q).score for q in queries])
    assert positional_auroc == 1.0
    assert free_auroc < positional_auroc


# -------------------------------------------------------------------------- estimator contract

def test_experts_follow_the_scikit_learn_estimator_shape(backbone):
    expert = PatchKNNExpert(backbone, k=3, positional_radius=1)
    assert expert.get_params()["k"] == 3 and expert.get_params()["positional_radius"] == 1
    assert not [name for name in vars(expert) if name.endswith("_")]  # no work in __init__
    copy = clone(expert).set_params(k=1)
    assert copy.k == 1 and expert.k == 3
    assert SubspaceExpert(variance=0.9).get_params()["variance"] == 0.9


@pytest.mark.parametrize("expert_class", EXPERT_CLASSES)
def test_scoring_before_fit_raises(expert_class):
    with pytest.raises(NotFittedError):
        expert_class().score(normal_image(0))


@pytest.mark.parametrize("expert, message", [
    (PatchKNNExpert(top_fraction=0.0), "top_fraction"),
    (PatchKNNExpert(k=0), "k must be"),
    (PatchKNNExpert(metric="manhattan"), "metric"),
    (PatchKNNExpert(positional_radius=-1), "positional_radius"),
    (SubspaceExpert(variance=1.5), "variance"),
    (SubspaceExpert(n_components=10_000), "n_components"),
    (SubspaceExpert(smoothing=-1), "smoothing"),
])
def test_bad_parameters_are_reported_at_fit(expert, message, references):
    with pytest.raises(ValueError, match=message):
        expert.fit(references)


def test_feature_shapes_are_checked(backbone, references):
    expert = PatchKNNExpert(backbone)
    with pytest.raises(ValueError, match=r"\[R, gh, gw, D\]"):
        expert.fit_features(np.zeros((32, 32, 8), np.float32))
    expert.fit(references)
    with pytest.raises(ValueError, match="same backbone"):
        expert.score_features(np.zeros((16, 16, 8), np.float32), (64, 64))
    with pytest.raises(ValueError, match="uint8"):
        expert.score(np.zeros((64, 64), np.uint8))


def test_default_backbone_is_classic(references):
    expert = SubspaceExpert().fit(references[:2])
    assert expert.backbone_.name == "classic"
    assert PatchKNNExpert(backbone="classic").fit(references[:2]).metric_ == "euclidean"


# ------------------------------------------------------------------------------------------ pool

class CountingBackbone:
    """The classic backbone, counting how many images it embedded."""

    name = "classic"
    device = "cpu"

    def __init__(self):
        self.inner = ClassicBackbone()
        self.calls = 0
        self.encoded = 0
        self.lock = threading.Lock()

    def patch_features(self, images):
        with self.lock:
            self.calls += 1
            self.encoded += len(images)
        return self.inner.patch_features(images)

    def embed(self, images):
        return self.inner.embed(images)


def test_pool_fits_each_reference_set_once(references):
    backbone = CountingBackbone()
    pool = ExpertPool(backbone)
    loads = []

    def loader():
        loads.append(1)
        return references

    key = ("a.png", "b.png", "c.png", "d.png")
    knn = pool.expert("anomaly_vfm", key, loader)
    assert pool.expert("anomaly_vfm", key, loader) is knn
    subspace = pool.expert("subspace_ad", key, loader)
    assert isinstance(subspace, SubspaceExpert) and isinstance(knn, PatchKNNExpert)
    assert len(loads) == 1 and backbone.calls == 1  # features shared by both experts
    stats = pool.stats
    assert (stats["hits"], stats["misses"], stats["sets"]) == (1, 2, 1)
    assert stats["fit_seconds"] > 0
    # Parameters are part of the key.
    positional = pool.expert("anomaly_vfm", key, loader, positional_radius=2)
    assert positional is not knn and positional.positional_radius == 2
    assert len(loads) == 1


def test_pool_is_thread_safe_one_fit_for_concurrent_requests(references):
    backbone = CountingBackbone()
    pool = ExpertPool(backbone)
    loads = []

    def slow_loader():
        loads.append(1)
        time.sleep(0.2)  # every thread arrives while the first is still loading
        return references

    results, errors = [], []

    def ask():
        try:
            results.append(pool.expert("subspace_ad", ("x.png", "y.png"), slow_loader))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(loads) == 1 and backbone.calls == 1
    assert all(r is results[0] for r in results)
    assert pool.stats["misses"] == 1 and pool.stats["hits"] == 7


def test_pool_evicts_the_least_recently_used_set(references):
    backbone = CountingBackbone()
    pool = ExpertPool(backbone, max_sets=2)
    loader = lambda: references[:2]  # noqa: E731
    pool.expert("anomaly_vfm", ("1",), loader)
    pool.expert("anomaly_vfm", ("2",), loader)
    pool.expert("anomaly_vfm", ("1",), loader)  # 1 is now the most recent
    pool.expert("anomaly_vfm", ("3",), loader)  # evicts 2
    assert pool.stats["sets"] == 2
    calls = backbone.calls
    pool.expert("anomaly_vfm", ("1",), loader)
    assert backbone.calls == calls
    pool.expert("anomaly_vfm", ("2",), loader)
    assert backbone.calls == calls + 1


def test_pool_encodes_an_image_shared_by_two_sets_once(references):
    backbone = CountingBackbone()
    pool = ExpertPool(backbone)
    a, b, c, d = references[:4]
    first = pool.expert("subspace_ad", ("a.png", "b.png", "c.png"), lambda: [a, b, c])
    second = pool.expert("subspace_ad", ("b.png", "c.png", "d.png"), lambda: [b, c, d])
    assert backbone.encoded == 4  # b and c once each
    stats = pool.stats
    assert (stats["image_hits"], stats["image_misses"], stats["images"]) == (2, 4, 4)
    # The second set's features are exactly what encoding it afresh gives.
    fresh = ExpertPool(ClassicBackbone()).expert("subspace_ad", ("b.png", "c.png", "d.png"), lambda: [b, c, d])
    query = normal_image(9)
    assert second.score(query).score == pytest.approx(fresh.score(query).score, rel=1e-6)
    assert first is not second
    # The same path at another size is another image.
    small = [im[::2, ::2].copy() for im in (a, b)]
    before = backbone.encoded
    pool.expert("subspace_ad", ("a.png", "b.png"), lambda: small)
    assert backbone.encoded == before + 2


def test_pool_feature_budget_evicts_old_images(references):
    one = ClassicBackbone().patch_features(references[:1]).nbytes
    pool = ExpertPool(CountingBackbone(), max_feature_mb=2.5 * one / 2**20)
    pool.expert("subspace_ad", ("a", "b"), lambda: references[:2])
    pool.expert("subspace_ad", ("c", "d"), lambda: references[2:4])
    assert pool.stats["images"] == 2
    assert pool._image_features.stats()["bytes"] <= pool.max_feature_bytes


def test_default_params_make_patch_knn_positional_on_aligned_domains():
    from anomalyclaw.experts import default_params

    assert default_params("anomaly_vfm", {"object", "aligned"}) == {"positional_radius": 1}
    assert default_params("anomaly_vfm", {"texture"}) == {}
    assert default_params("subspace_ad", {"aligned"}) == {}


def test_pool_rejects_unknown_experts_and_empty_sets(references):
    pool = ExpertPool("classic")
    with pytest.raises(ValueError, match="unknown expert"):
        pool.expert("patchcore", ("a",), lambda: references)
    with pytest.raises(ValueError, match="at least one reference"):
        pool.expert("anomaly_vfm", (), lambda: references)
    assert pool.backbone.name == "classic"


# ------------------------------------------------------------------------------------------ maps

def test_normalize_map_scales_to_unit_range():
    anomaly_map = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    scaled = normalize_map(anomaly_map)
    assert scaled.dtype == np.float32 and scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.allclose(normalize_map(anomaly_map, low=2.0, high=4.0), [[0, 0], [0.5, 1]])
    assert not normalize_map(np.full((3, 3), 7.0)).any()
    with pytest.raises(ValueError, match="2-D"):
        normalize_map(np.zeros((2, 2, 3)))


def test_overlay_heatmap_colours_hot_regions_red():
    image = np.full((40, 60, 3), 128, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[:, 15:] = 1.0  # resized to the image
    overlay = overlay_heatmap(image, heat, alpha=0.6)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    hot, cold = overlay[20, 50], overlay[20, 5]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # JET: red for 1, blue for 0
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, heat, alpha=2.0)


def test_suggest_bbox_boxes_the_hottest_blob():
    heat = np.zeros((100, 200), np.float32)
    heat[20:40, 120:160] = 0.9
    heat[70:75, 10:15] = 0.6
    assert suggest_bbox(heat) == [0.6, 0.2, 0.8, 0.4]
    assert suggest_bbox(np.zeros((10, 10))) is None
    assert suggest_bbox(heat * 0.1, min_peak=0.5) is None


def test_top_regions_lists_blobs_hottest_first_and_drops_specks():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 10:30] = 0.7
    heat[50:80, 60:90] = 0.95
    heat[95, 95] = 1.0  # one pixel: noise
    regions = top_regions(heat, k=5, level=0.5, min_area_frac=0.001)
    assert [r["peak"] for r in regions] == [0.95, 0.7]
    assert regions[0]["bbox"] == [0.6, 0.5, 0.9, 0.8]
    assert regions[0]["area_frac"] == pytest.approx(0.09)
    assert top_regions(heat, k=1, min_area_frac=0.0)[0]["peak"] == 1.0  # the speck, once allowed
    assert top_regions(np.zeros((10, 10))) == []


def test_expert_map_gives_a_box_on_the_defect(backbone, references):
    query, mask = defective_image(0)
    result = SubspaceExpert(backbone).fit(references).score(query)
    box = suggest_bbox(normalize_map(result.anomaly_map, *result.normal_range))
    assert box is not None
    rows, cols = np.nonzero(mask)
    cx, cy = cols.mean() / mask.shape[1], rows.mean() / mask.shape[0]
    assert box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


# ------------------------------------------------------------------------------------ benchmark

def _tiny_benchmark(tmp_path) -> Path:
    """Two domains (the surface and the dot tray), 4 references and 6 test items each."""
    from anomalyclaw.eval.data.manifests import write_manifest
    from anomalyclaw.imaging import save_image

    rows = []
    for code, normal, defect in [("T1", normal_image, defective_image),
                                 ("T2", lambda s: _dot_tray(seed=s), None)]:
        refs = []
        for i in range(4):
            save_image(normal(200 + i), tmp_path / code / f"ref_{i}.png")
            refs.append(str(tmp_path / code / f"ref_{i}.png"))
        for i in range(6):
            label = i % 2
            mask = None
            if label and defect is not None:
                image, mask = defect(i)
            elif label:
                image, mask = _dot_tray(missing=i, seed=300 + i), None  # anomalous without a mask
            else:
                image = normal(300 + i)
            query = tmp_path / code / f"q_{i}.png"
            save_image(image, query)
            row = {"item_id": f"{code}_{i}", "domain_code": code, "query_path": str(query), "ref_paths": refs,
                   "label": label, "split": "test" if i < 5 else "dev"}
            if mask is not None:
                save_image((mask * 255).astype(np.uint8), tmp_path / code / f"m_{i}.png")
                row["mask_path"] = str(tmp_path / code / f"m_{i}.png")
            rows.append(row)
    return write_manifest(rows, tmp_path / "manifest.json")


def test_expert_benchmark_reports_per_domain_aurocs_and_times(tmp_path, capsys):
    from anomalyclaw.cli import main
    from anomalyclaw.eval.bench.experts import format_table, run_expert_benchmark

    manifest = _tiny_benchmark(tmp_path)
    report = run_expert_benchmark(manifest, split="test")
    assert report["items"] == 10 and set(report["per_domain"]) == {"T1", "T2"}
    t1, t2 = report["per_domain"]["T1"], report["per_domain"]["T2"]
    assert (t1["n"], t1["n_anomalous"], t1["n_masked"]) == (5, 2, 5)
    assert t2["n_masked"] == 3  # the normal items only: anomalous ones have no mask
    for name in ("anomaly_vfm", "subspace_ad"):
        assert t1[name]["image_auroc"] == 1.0
        assert t1[name]["pixel_auroc"] > 0.9
        assert np.isnan(t2[name]["pixel_auroc"])  # all-normal pixels: AUROC undefined
        assert t1[name]["fit_ms"] > 0 and t1[name]["score_ms"] > 0
        assert 0 <= report["macro"][name]["image_auroc"] <= 1
    assert report["pool"]["misses"] == 4 and report["pool"]["hits"] == 16  # one fit per set and expert
    table = format_table(report)
    assert "T1" in table and "macro" in table and "anomaly_vfm img" in table

    assert main(["bench", "experts", "--manifest", str(manifest), "--split", "all", "--positional", "1",
                 "--out", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "12 items" in out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["expert_params"] == {"anomaly_vfm": {"positional_radius": 1}}
    assert main(["bench", "experts", "--manifest", str(manifest), "--domains", "T9"]) == 2
    assert "no items" in capsys.readouterr().err


def test_cell_histograms_are_the_direct_per_cell_counts():
    from anomalyclaw.experts.backbones import _cell_histogram

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, size=(64, 64)).astype(np.uint8)
    weights = rng.random((64, 64)).astype(np.float32)
    for w in (None, weights):
        got = _cell_histogram(labels, w, 8, 10)
        expected = np.zeros((8, 8, 10))
        for y in range(64):
            for x in range(64):
                expected[y // 8, x // 8, labels[y, x]] += 1.0 if w is None else w[y, x]
        assert np.allclose(got, expected / 64, atol=1e-6)
    # The cell index is built once per geometry and shared read-only.
    from anomalyclaw.experts.backbones import _cell_index

    assert _cell_index(64, 8, 10) is _cell_index(64, 8, 10) and not _cell_index(64, 8, 10).flags.writeable
