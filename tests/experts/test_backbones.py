"""Backbones: the classic descriptors, and DINOv2 / CLIP loaded from tiny local checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from anomalyclaw.errors import ConfigError, WeightsNotFoundError
from anomalyclaw.experts.backbones import ClassicBackbone, _lbp_riu2, load_backbone


def _texture(seed: int, shape=(200, 260)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape + (3,), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- classic

def test_classic_shapes_dtype_and_one_grid_for_any_sizes():
    backbone = load_backbone("classic")
    images = [_texture(0, (200, 260)), _texture(1, (64, 48)), _texture(2, (512, 512))]
    features = backbone.patch_features(images)
    assert features.shape == (3, 32, 32, backbone.dim)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    assert backbone.grid == (32, 32)


def test_classic_orientation_histograms_are_optional():
    plain, oriented = ClassicBackbone(), ClassicBackbone(orientation_bins=8)
    assert oriented.dim == plain.dim + 2 * 2 * 8
    features = oriented.patch_features([_texture(9)])
    assert features.shape == (1, 32, 32, oriented.dim) and np.isfinite(features).all()
    with pytest.raises(ConfigError, match="orientation_bins"):
        ClassicBackbone(orientation_bins=-1)


def test_classic_is_deterministic_and_order_independent():
    backbone = ClassicBackbone()
    a, b = _texture(3), _texture(4)
    together = backbone.patch_features([a, b])
    assert np.array_equal(together, backbone.patch_features([a, b]))
    assert np.array_equal(together[1], backbone.patch_features([b])[0])


def test_classic_work_size_sets_the_grid():
    backbone = ClassicBackbone(work_size=128)
    assert backbone.patch_features([_texture(5)]).shape[1:3] == (16, 16)
    with pytest.raises(ConfigError, match="multiple"):
        ClassicBackbone(work_size=100)
    with pytest.raises(ConfigError, match="odd"):
        ClassicBackbone(aggregate=2)


def test_classic_descriptors_see_colour_and_texture():
    backbone = ClassicBackbone()
    flat_grey = np.full((256, 256, 3), 128, np.uint8)
    flat_red = flat_grey.copy()
    flat_red[..., 0] = 200
    noisy_grey = np.clip(flat_grey + np.random.default_rng(0).normal(0, 25, flat_grey.shape), 0, 255).astype(np.uint8)
    grey, red, noisy = backbone.patch_features([flat_grey, flat_red, noisy_grey])
    # Colour moves the Lab part, texture the rest; each differs from the flat grey image.
    assert np.linalg.norm(red - grey, axis=-1).mean() > 0.5
    assert np.linalg.norm(noisy - grey, axis=-1).mean() > 0.5
    # A flat image has a flat descriptor field.
    assert np.allclose(grey, grey[0, 0], atol=1e-5)


def test_lbp_labels_are_rotation_invariant_and_flat_means_uniform():
    lightness = np.random.default_rng(1).random((40, 40)).astype(np.float32)
    labels = _lbp_riu2(lightness)
    assert labels.min() >= 0 and labels.max() <= 9
    # On the square ring a 90 degree turn is a cyclic shift of two bits: same label.
    rotated = _lbp_riu2(np.ascontiguousarray(np.rot90(lightness)))
    assert np.array_equal(rotated[1:-1, 1:-1], np.rot90(labels)[1:-1, 1:-1])
    assert (_lbp_riu2(np.zeros((8, 8), np.float32)) == 8).all()


def test_lbp_labels_match_a_plain_numpy_reading_of_the_ring():
    """OpenCV's comparisons and lookup give what the definition says, ties (>=) and edges
    (replicated) included: each neighbour at least the centre sets its bit, the code's label
    comes from the riu2 table."""
    from anomalyclaw.experts.backbones import _LBP_OFFSETS, _RIU2

    rng = np.random.default_rng(3)
    smooth = rng.random((37, 53)).astype(np.float32) * 100
    for lightness in (smooth, np.round(smooth / 25) * 25, np.zeros((5, 7), np.float32)):
        h, w = lightness.shape
        padded = np.pad(lightness, 1, mode="edge")
        code = np.zeros((h, w), np.int64)
        for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
            code += (padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] >= lightness).astype(np.int64) << bit
        assert np.array_equal(_lbp_riu2(np.ascontiguousarray(lightness)), _RIU2[code])


def test_classic_embed_is_l2_normalised_and_separates_images():
    backbone = ClassicBackbone()
    smooth = np.full((100, 100, 3), 90, np.uint8)
    embeddings = backbone.embed([_texture(6), _texture(7), smooth])
    assert embeddings.shape == (3, 2 * backbone.dim)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2]


@pytest.mark.parametrize("bad, message", [
    ([], "no images"),
    ([np.zeros((32, 32), np.uint8)], "H x W x 3 uint8"),
    ([np.zeros((32, 32, 3), np.float32)], "H x W x 3 uint8"),
    (["image.png"], "numpy array"),
])
def test_classic_rejects_bad_input_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        ClassicBackbone().patch_features(bad)


def test_a_single_array_is_not_mistaken_for_a_batch():
    with pytest.raises(ValueError, match="wrap it in a list"):
        ClassicBackbone().patch_features(_texture(8))


def test_load_backbone_names():
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_backbone("resnet")
    with pytest.raises(ConfigError, match="needs no weights"):
        load_backbone("classic", path="/some/where")


# ----------------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Randomly initialised tiny DINOv2 (plain and with registers) and CLIP vision models, saved
    like downloaded checkpoints: the loading code is the real one, nothing is downloaded."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    paths = {"dinov2": root / "dinov2", "dinov2_registers": root / "dinov2_registers", "clip": root / "clip"}
    transformers.Dinov2Model(transformers.Dinov2Config(image_size=56, patch_size=14, **small)
                             ).save_pretrained(paths["dinov2"])
    transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        image_size=56, patch_size=14, num_register_tokens=4, **small)).save_pretrained(paths["dinov2_registers"])
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=32, patch_size=16, **small)
                                 ).save_pretrained(paths["clip"])
    processor_config = ('{"image_processor_type": "BitImageProcessor", "image_mean": [0.485, 0.456, 0.406], '
                        '"image_std": [0.229, 0.224, 0.225]}')
    (paths["dinov2"] / "preprocessor_config.json").write_text(processor_config)
    return paths


@pytest.mark.parametrize("name, key, kw, grid", [
    ("dinov2", "dinov2", {"image_size": 56}, (4, 4)),
    ("dinov2", "dinov2", {"image_size": 112}, (8, 8)),          # position embeddings interpolated
    ("dinov2", "dinov2_registers", {"image_size": 56}, (4, 4)),  # register tokens dropped
    ("clip", "clip", {}, (2, 2)),                                # the model's own 32 px
    ("clip", "clip", {"image_size": 64}, (4, 4)),                # interpolate_pos_encoding
])
def test_transformers_backbone_loads_locally_and_returns_the_grid(tiny_checkpoints, name, key, kw, grid):
    backbone = load_backbone(name, tiny_checkpoints[key], device="cpu", batch_size=2, **kw)
    assert backbone.name == name and backbone.device == "cpu"
    images = [_texture(10, (90, 70)), _texture(11, (40, 40)), _texture(12, (300, 200))]
    features = backbone.patch_features(images)
    assert features.shape == (3,) + grid + (32,)
    assert features.dtype == np.float32 and np.isfinite(features).all()
    assert np.allclose(backbone.patch_features(images[1:2])[0], features[1], atol=1e-5)  # batching is exact
    embeddings = backbone.embed(images)
    assert embeddings.shape == (3, 32)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_transformers_backbone_works_with_an_expert(tiny_checkpoints):
    from anomalyclaw.experts import PatchKNNExpert, SubspaceExpert

    backbone = load_backbone("dinov2", tiny_checkpoints["dinov2"], device="cpu", image_size=56)
    references = [_texture(20 + i) for i in range(3)]
    for expert in (PatchKNNExpert(backbone), SubspaceExpert(backbone, n_components=4)):
        result = expert.fit(references).score(_texture(30, (120, 90)))
        assert result.anomaly_map.shape == (120, 90) and result.patch_map.shape == (4, 4)
    assert PatchKNNExpert(backbone).fit(references).metric_ == "cosine"


def test_missing_weights_name_the_model_and_the_way_out(tmp_path):
    pytest.importorskip("transformers")
    for kind, path in [("dinov2", tmp_path / "absent"), ("clip", tmp_path / "absent"),
                       ("dinov2", "no-such-org/no-such-model")]:
        with pytest.raises(WeightsNotFoundError) as info:
            load_backbone(kind, path, device="cpu")
        message = str(info.value)
        default = "facebook/dinov2-small" if kind == "dinov2" else "openai/clip-vit-base-patch16"
        assert f"huggingface-cli download {default}" in message
        assert "--backbone-path" in message and "--backbone classic" in message
        assert str(path) in message


def test_a_folder_without_a_checkpoint_is_reported(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="holds no loadable dinov2 checkpoint"):
        load_backbone("dinov2", tmp_path / "empty", device="cpu")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsNotFoundError, match="is a file"):
        load_backbone("dinov2", tmp_path / "model.safetensors", device="cpu")
