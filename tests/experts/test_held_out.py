"""The leave-one-out calibration from shared parts (image pairs, image moments) against the
original refits: the same scores to float32 rounding, and a new set sharing images reuses them."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from anomalyclaw.cache import LRUCache
from anomalyclaw.experts import ClassicBackbone, ExpertPool, PatchKNNExpert, SubspaceExpert
from anomalyclaw.experts.patchknn import nearest_distances, pair_nearest, positional_distances
from anomalyclaw.experts.subspace import _residual_energy

from test_experts import defective_image, normal_image  # same folder (pytest puts it on sys.path)


@pytest.fixture(scope="module")
def backbone():
    return ClassicBackbone()


@pytest.fixture(scope="module")
def features(backbone):
    return backbone.patch_features([normal_image(s) for s in range(5)])


@pytest.mark.parametrize("params", [{}, {"k": 3}, {"positional_radius": 1}, {"positional_radius": 1, "k": 2},
                                    {"metric": "cosine"}])
def test_knn_pairs_give_the_direct_scores(backbone, features, params):
    direct = PatchKNNExpert(backbone, held_out="direct", **params).fit_features(features, backbone=backbone)
    store = LRUCache("test.held_out")
    ids = [f"ref{i}" for i in range(len(features))]
    pairs = PatchKNNExpert(backbone, **params).fit_features(features, backbone=backbone, reference_ids=ids,
                                                             store=store)
    assert np.allclose(pairs.reference_patch_maps_, direct.reference_patch_maps_, rtol=1e-4, atol=1e-4)
    assert np.allclose(pairs.reference_scores_, direct.reference_scores_, rtol=1e-5)
    query = backbone.patch_features([defective_image(1)[0]])[0]
    assert pairs.score_features(query, (192, 192)).unit_score() == pytest.approx(
        direct.score_features(query, (192, 192)).unit_score(), abs=1e-5)
    # Without a store the same numbers come out (every pair computed once, both ways).
    alone = PatchKNNExpert(backbone, **params).fit_features(features, backbone=backbone)
    assert np.array_equal(alone.reference_patch_maps_, pairs.reference_patch_maps_)


def test_a_set_sharing_images_reuses_their_pairs(backbone, features):
    store = LRUCache("test.held_out")
    PatchKNNExpert(backbone).fit_features(features[:4], backbone=backbone, reference_ids=["a", "b", "c", "d"],
                                          store=store)
    assert store.stats()["misses"] == 6  # 4 * 3 / 2 unordered pairs, each giving both directions
    second = PatchKNNExpert(backbone).fit_features(features[1:5], backbone=backbone,
                                                   reference_ids=["b", "c", "d", "e"], store=store)
    # b, c, d's pairs were known: only the three pairs with e are new.
    assert store.stats()["misses"] == 6 + 3
    fresh = PatchKNNExpert(backbone, held_out="direct").fit_features(features[1:5], backbone=backbone)
    assert np.allclose(second.reference_scores_, fresh.reference_scores_, rtol=1e-5)


def test_pair_nearest_is_both_directions_of_one_search():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 9)).astype(np.float32), rng.normal(size=(200, 9)).astype(np.float32)
    for k in (1, 2):
        ab, ba = pair_nearest(a, b, k)
        assert ab.shape == (300, k) and ba.shape == (200, k)
        assert np.allclose(np.sqrt(np.sort(ab, axis=1)).mean(axis=1), nearest_distances(a, b, k), atol=1e-4)
        assert np.allclose(np.sqrt(np.sort(ba, axis=1)).mean(axis=1), nearest_distances(b, a, k), atol=1e-4)


def test_subspace_moments_match_a_float64_refit(backbone, features):
    """The moments give the subspace a float64 PCA finds; the original float32 refit differs from
    both by its own rounding (float32 covariance), which is why ``direct`` is compared loosely."""
    ids = [f"ref{i}" for i in range(len(features))]
    moments = SubspaceExpert(backbone).fit_features(features, backbone=backbone, reference_ids=ids,
                                                     store=LRUCache("test.held_out"))
    flat = features.reshape(len(features), -1, features.shape[-1])
    for r in (0, 3):
        others = np.concatenate([flat[i] for i in range(len(features)) if i != r]).astype(np.float64)
        pca = PCA(n_components=0.99, svd_solver="full").fit(others)
        truth = _residual_energy(pca, flat[r].astype(np.float64))
        assert np.allclose(moments.reference_patch_maps_[r].ravel(), truth, rtol=1e-4, atol=1e-5 * truth.max())
    direct = SubspaceExpert(backbone, held_out="direct").fit_features(features, backbone=backbone)
    assert moments.n_components_ == direct.n_components_
    assert np.allclose(moments.reference_scores_, direct.reference_scores_, rtol=0.05)
    query = backbone.patch_features([defective_image(0)[0]])[0]
    assert moments.score_features(query, (192, 192)).score == pytest.approx(
        direct.score_features(query, (192, 192)).score, rel=0.05)


def test_subspace_fixed_components_and_the_single_reference_case(backbone, features):
    expert = SubspaceExpert(backbone, n_components=5).fit_features(features[:3], backbone=backbone)
    assert expert.n_components_ == 5 and expert.pca_.components_.shape == (5, features.shape[-1])
    one = SubspaceExpert(backbone).fit_features(features[:1], backbone=backbone)  # quadrants: sklearn refits
    assert one.reference_scores_.shape == (1,) and one.reference_scores_[0] > 0
    with pytest.raises(ValueError, match="held_out must be"):
        SubspaceExpert(backbone, held_out="nope").fit_features(features[:2], backbone=backbone)
    with pytest.raises(ValueError, match="held_out must be"):
        PatchKNNExpert(backbone, held_out="moments").fit_features(features[:2], backbone=backbone)


def test_pool_shares_parts_across_sets_and_direct_pool_shares_none(features):
    images = [normal_image(s) for s in range(5)]
    shared = ExpertPool(ClassicBackbone())
    direct = ExpertPool(ClassicBackbone(), held_out="direct")
    for pool in (shared, direct):
        for name in ("anomaly_vfm", "subspace_ad"):
            pool.expert(name, ("a", "b", "c"), lambda: images[:3])
            pool.expert(name, ("b", "c", "d"), lambda: images[1:4])
    assert shared.stats["held_out_hits"] > 0 and direct.stats["held_out_hits"] == direct.stats["held_out_misses"] == 0
    query = defective_image(3)[0]
    a = shared.expert("anomaly_vfm", ("b", "c", "d"), lambda: images[1:4]).score(query)
    b = direct.expert("anomaly_vfm", ("b", "c", "d"), lambda: images[1:4]).score(query)
    assert a.score == pytest.approx(b.score, rel=1e-5) and a.rank == b.rank
    with pytest.raises(ValueError, match="held_out must be"):
        ExpertPool("classic", held_out="sometimes")


def test_positional_distances_are_the_root_mean_of_positional_nearest():
    from anomalyclaw.experts.patchknn import positional_nearest

    rng = np.random.default_rng(5)
    query, refs = rng.normal(size=(4, 5, 3)).astype(np.float32), rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    near = positional_nearest(query, refs, 1, 2)
    assert near.shape == (2, 4, 5)
    assert np.allclose(positional_distances(query, refs, 1, 2), np.sqrt(np.maximum(near, 0)).mean(axis=0))
