"""Frozen feature backbones that turn RGB images into a grid of patch descriptors.

Two kinds sit behind one :class:`Backbone` protocol:

* ``classic``: weight-free multi-scale descriptors per 8x8 cell (Lab colour, local contrast,
  gradient-orientation histograms and local binary patterns at two scales), aggregated over a
  3x3 neighbourhood as PatchCore does. Runs anywhere, on one CPU core (``anomalyclaw bench``
  reports its cost).
* ``dinov2`` and ``clip``: vision transformers through ``transformers``, loaded from a local
  folder or the local Hugging Face cache only (never downloaded), batched, in half precision on
  a GPU.

Every backbone resizes each image to one square working size, so all images of a call share
the same grid whatever their own sizes; experts map patch scores back to each image's own size.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from anomalyclaw.errors import ConfigError, WeightsNotFoundError


@runtime_checkable
class Backbone(Protocol):
    """What experts need from a feature extractor."""

    name: str
    device: str

    def patch_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Patch descriptors of ``images`` (each H x W x 3 uint8 RGB, any size).

        Returns float32 ``[N, gh, gw, D]``, the same grid for every image.
        """
        ...

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One L2-normalised float32 descriptor ``[N, D]`` per image (for retrieval)."""
        ...


def check_images(images: Sequence[np.ndarray], what: str = "images") -> list[np.ndarray]:
    """Validate a batch at the boundary: a non-empty sequence of H x W x 3 uint8 arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(f"{what}: expected a sequence of images, got one array of shape "
                         f"{images.shape}; wrap it in a list")
    batch = list(images)
    if not batch:
        raise ValueError(f"{what}: got no images; pass at least one H x W x 3 uint8 RGB array")
    for i, img in enumerate(batch):
        if not isinstance(img, np.ndarray):
            raise ValueError(f"{what}[{i}]: expected a numpy array, got {type(img).__name__}; "
                             "load files with anomalyclaw.imaging.load_image")
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"{what}[{i}]: expected an H x W x 3 uint8 RGB array, got shape "
                             f"{img.shape} dtype {img.dtype}; load files with "
                             "anomalyclaw.imaging.load_image")
    return batch


# --------------------------------------------------------------------------------------------
# classic: weight-free descriptors
# --------------------------------------------------------------------------------------------

def _riu2_table(neighbours: int = 8) -> np.ndarray:
    """Map each 8-bit LBP code to its rotation-invariant uniform label (0..P+1).

    The same labels as ``skimage.feature.local_binary_pattern(..., method="uniform")``:
    a code with at most two 0/1 transitions around the circle is labelled by its number of
    ones, every other code by P + 1.
    """
    codes = np.arange(2 ** neighbours)
    rotated = ((codes << 1) | (codes >> (neighbours - 1))) & (2 ** neighbours - 1)
    transitions = np.array([bin(c).count("1") for c in codes ^ rotated])
    ones = np.array([bin(c).count("1") for c in codes])
    return np.where(transitions <= 2, ones, neighbours + 1).astype(np.uint8)


_RIU2 = _riu2_table()
# Neighbours in circular order, so that bit rotation is rotation of the pattern.
_LBP_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _lbp_riu2(lightness: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform LBP labels (H x W uint8 in 0..9) on the 8 square neighbours.

    skimage's interpolated circular LBP costs more than every other descriptor together; on the
    3x3 square ring the same labels cost a small fraction of that. OpenCV's comparisons and the
    table lookup: the same labels as NumPy's ``>=``, shifts and fancy indexing, at a third of
    their time (0.16 against 0.47 ms per 256 px image, one thread).
    """
    h, w = lightness.shape
    padded = cv2.copyMakeBorder(lightness, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    code = np.zeros((h, w), np.uint8)
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        at_least = cv2.compare(padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], lightness, cv2.CMP_GE)  # 255 or 0
        code |= at_least & np.uint8(1 << bit)
    return cv2.LUT(code, _RIU2)


def _cell_mean(image: np.ndarray, grid: int) -> np.ndarray:
    """Mean over each cell of a square image whose side is ``grid`` times the cell size."""
    return cv2.resize(image, (grid, grid), interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=16)
def _cell_index(side: int, grid: int, n_bins: int) -> np.ndarray:
    """``[side, side]`` intp: each pixel's cell times ``n_bins`` (the first bin of its cell in
    :func:`_cell_histogram`'s counts); built once per geometry, read-only."""
    cell_row = np.arange(side) // (side // grid)
    index = ((cell_row[:, None] * grid + cell_row[None, :]) * n_bins).astype(np.intp)
    index.flags.writeable = False
    return index


def _cell_histogram(bins_of_pixel: np.ndarray, weights: np.ndarray | None, grid: int,
                    n_bins: int) -> np.ndarray:
    """``[grid, grid, n_bins]``: per cell, the mean over its pixels of ``weights`` (1 when
    None) falling in each bin; one ``bincount`` instead of a per-pixel one-hot array."""
    side = bins_of_pixel.shape[0]
    cell = side // grid
    counts = np.bincount((_cell_index(side, grid, n_bins) + bins_of_pixel).ravel(),
                         weights=None if weights is None else weights.ravel(),
                         minlength=grid * grid * n_bins)
    return (counts / (cell * cell)).reshape(grid, grid, n_bins).astype(np.float32)


def _gradients(lightness: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradient magnitude and angle (radians) of a float32 lightness image."""
    gx = cv2.Sobel(lightness, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(lightness, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.cartToPolar(gx, gy)


def _orientation_histograms(magnitude: np.ndarray, angle: np.ndarray, grid: int, bins: int,
                            contrast_floor: float) -> np.ndarray:
    """Per cell: the unsigned gradient-orientation distribution ``[g, g, bins]``.

    Votes are magnitude-weighted and split linearly between the two nearest bins (as in HOG).
    The histogram is divided by (mean magnitude + ``contrast_floor``) rather than by its own
    sum, so flat cells stay near zero instead of amplifying noise into a confident orientation.
    """
    position = np.mod(angle, np.pi) * (bins / np.pi)
    lower = position.astype(np.int64)
    upper_weight = position - lower
    histogram = (_cell_histogram(lower % bins, magnitude * (1.0 - upper_weight), grid, bins)
                 + _cell_histogram((lower + 1) % bins, magnitude * upper_weight, grid, bins))
    return histogram / (_cell_mean(magnitude, grid)[..., None] + contrast_floor)


def _lbp_histograms(lightness: np.ndarray, grid: int) -> np.ndarray:
    """Per cell: the frequency of each of the 10 rotation-invariant uniform LBP labels."""
    return _cell_histogram(_lbp_riu2(lightness), None, grid, 10)


@dataclass
class ClassicBackbone:
    """Weight-free multi-scale patch descriptors: no download, no GPU.

    Each image is resized to ``work_size`` x ``work_size`` px and cut into ``cell`` x ``cell``
    px cells (256 / 8 = a 32 x 32 grid). Per cell, in this order:

    ========================  ====  =====================================================
    Lab mean                     3  colour, CIE Lab, divided by 20 (a unit ~ 20 delta-E)
    Lab standard deviation       3  local contrast per channel, divided by 8
    gradient energy              2  log(1 + mean Sobel magnitude / 8), full and half scale
    LBP histograms              20  10 rotation-invariant uniform labels, full and half
                                    scale, square-rooted, times ``texture_weight``
    orientation histograms  2 x B   only when ``orientation_bins`` B > 0: unsigned gradient
                                    orientations, full and half scale, square-rooted
    ========================  ====  =====================================================

    The 28 cell numbers are followed by the same 28 averaged over the ``aggregate`` x
    ``aggregate`` neighbourhood (PatchCore's local aggregation), so a descriptor sees both
    the cell and its context: D = 56. Square roots make Euclidean distance between
    histograms the Hellinger distance; the divisors give colour, contrast and energy a
    spread of about one unit on natural images (measured on the scikit-image sample images).

    The defaults were chosen on the synthetic benchmark (seed 1, 60 test items per domain,
    patch kNN image AUROC): weighting the texture histograms down from 1.5 to 0.75 and
    leaving out orientation histograms scored 0.635 against 0.585 for the 88-D descriptor
    with both; a single larger context (5x5) or extra ones (7x7, 9x9) did not help.
    Orientation histograms also break the rotation invariance every other family has.
    """

    work_size: int = 256
    cell: int = 8
    aggregate: int = 3
    texture_weight: float = 0.75
    orientation_bins: int = 0
    name: str = field(default="classic", init=False)
    device: str = field(default="cpu", init=False)

    def __post_init__(self) -> None:
        if self.cell < 2 or self.work_size % (2 * self.cell) != 0:
            raise ConfigError(f"classic backbone: work_size {self.work_size} must be a multiple "
                              f"of 2 * cell = {2 * self.cell} (the half scale halves the cell)")
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise ConfigError(f"classic backbone: aggregate must be an odd number >= 1, got {self.aggregate}")
        if self.orientation_bins < 0:
            raise ConfigError(f"classic backbone: orientation_bins must be >= 0, got {self.orientation_bins}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.work_size // self.cell
        return side, side

    @property
    def dim(self) -> int:
        per_cell = 3 + 3 + 2 + 2 * 10 + 2 * self.orientation_bins
        return per_cell * (2 if self.aggregate > 1 else 1)

    def _cell_descriptors(self, image: np.ndarray) -> np.ndarray:
        """``[g, g, per_cell]`` descriptors of one RGB uint8 image."""
        grid = self.grid[0]
        size = (self.work_size, self.work_size)
        interpolation = cv2.INTER_AREA if image.shape[0] * image.shape[1] > size[0] * size[1] else cv2.INTER_LINEAR
        rgb = cv2.resize(image, size, interpolation=interpolation).astype(np.float32) / 255.0
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)  # L in [0, 100], a and b in about [-100, 100]
        lab_mean = _cell_mean(lab, grid)
        lab_var = _cell_mean(lab * lab, grid) - lab_mean * lab_mean
        lab_std = np.sqrt(np.maximum(lab_var, 0.0))
        lightness = np.ascontiguousarray(lab[..., 0])
        # The half scale sees structures twice as large with the same cell grid.
        scales = [lightness, cv2.pyrDown(lightness)]
        energy, textures, orientations = [], [], []
        for level in scales:
            magnitude, angle = _gradients(level)
            energy.append(np.log1p(_cell_mean(magnitude, grid) / 8.0))
            textures.append(_lbp_histograms(level, grid))
            if self.orientation_bins:
                orientations.append(_orientation_histograms(magnitude, angle, grid, self.orientation_bins, 4.0))
        parts = [lab_mean / 20.0, lab_std / 8.0, np.stack(energy, axis=-1),
                 np.sqrt(np.concatenate(textures, axis=-1)) * self.texture_weight]
        if orientations:
            parts.append(np.sqrt(np.maximum(np.concatenate(orientations, axis=-1), 0.0)))
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def patch_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 ``[N, 32, 32, 56]`` for the default settings (see the class docstring)."""
        batch = check_images(images)
        out = np.empty((len(batch),) + self.grid + (self.dim,), np.float32)
        for i, image in enumerate(batch):
            cells = self._cell_descriptors(image)
            if self.aggregate > 1:
                context = cv2.blur(cells, (self.aggregate, self.aggregate), borderType=cv2.BORDER_REFLECT)
                cells = np.concatenate([cells, context], axis=-1)
            out[i] = cells
        return out

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Mean and standard deviation of the cell descriptors over the grid, L2-normalised:
        float32 ``[N, 2 * D]``. Close embeddings mean similar colour and texture statistics."""
        return self.embed_features(self.patch_features(images))

    @staticmethod
    def embed_features(features: np.ndarray) -> np.ndarray:
        """:meth:`embed` from patch features ``[N, gh, gw, D]`` already computed."""
        n = features.shape[0]
        flat = features.reshape(n, -1, features.shape[-1])
        pooled = np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)
        return _l2_normalise(pooled)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# transformers: DINOv2 and CLIP
# --------------------------------------------------------------------------------------------

DEFAULT_MODELS = {"dinov2": "facebook/dinov2-small", "clip": "openai/clip-vit-base-patch16"}
#: Normalisation used when a weights folder has no image-processor config.
_DEFAULT_STATS = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA GPU; "
                          "use --device cpu or --device auto")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _weights_missing(kind: str, source: str, reason: str) -> WeightsNotFoundError:
    default = DEFAULT_MODELS[kind]
    return WeightsNotFoundError(
        f"no weights for the {kind} backbone at {source!r} on disk ({reason}). Downloads are "
        f"disabled: download them with `huggingface-cli download {default}` on a machine with "
        f"internet, copy the folder here and pass --backbone-path DIR; or use --backbone classic "
        "(no weights needed).")


class TransformersBackbone:
    """DINOv2 or CLIP patch tokens from a local ``transformers`` checkpoint.

    Images are resized to ``image_size`` x ``image_size`` px (a multiple of the patch size;
    default 448 for DINOv2 = a 32 x 32 grid of 14 px patches, the model's own size for CLIP),
    normalised with the checkpoint's image-processor mean and std, and run in batches under
    ``torch.inference_mode``, in float16 on a GPU. Patch tokens are reshaped to the grid; the
    CLS token and any register tokens are dropped. ``embed`` returns the pooled CLS token.
    """

    def __init__(self, kind: str, source: str, *, device: str = "auto", image_size: int | None = None,
                 batch_size: int = 16):
        import torch
        from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

        if kind not in DEFAULT_MODELS:
            raise ConfigError(f"unknown transformers backbone {kind!r}; use one of {sorted(DEFAULT_MODELS)}")
        self.name = kind
        self.source = str(source)
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        local = Path(self.source).expanduser()
        looks_like_path = local.is_absolute() or self.source.startswith((".", "~")) or self.source.count("/") > 1
        if local.exists() and not local.is_dir():
            raise _weights_missing(kind, self.source, "the path is a file; pass the folder that holds "
                                   "config.json and the weights")
        if looks_like_path and not local.exists():
            raise _weights_missing(kind, self.source, "the folder does not exist")
        load_from = str(local) if local.exists() else self.source
        model_class = CLIPVisionModel if kind == "clip" else AutoModel
        try:
            model = model_class.from_pretrained(load_from, local_files_only=True)
        except (OSError, ValueError) as exc:
            if local.is_dir():
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                reason = f"the folder holds no loadable {kind} checkpoint: {detail}"
            else:
                reason = "not a local folder, and not in the local Hugging Face cache"
            raise _weights_missing(kind, self.source, reason) from None
        try:
            processor = AutoImageProcessor.from_pretrained(load_from, local_files_only=True)
            mean, std = processor.image_mean, processor.image_std
        except (OSError, ValueError, AttributeError):
            mean, std = _DEFAULT_STATS[kind]
        self._mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self._std = np.asarray(std, np.float32).reshape(1, 1, 3)
        config = model.config
        self.patch_size = int(config.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        native = int(config.image_size)
        size = image_size or (448 if kind == "dinov2" else native)
        if size % self.patch_size:
            raise ConfigError(f"{kind} backbone: image_size {size} must be a multiple of the patch "
                              f"size {self.patch_size}")
        self.image_size = size
        # CLIP's position embeddings are learned at one size; other sizes need interpolation.
        self._forward_kwargs: dict[str, Any] = ({"interpolate_pos_encoding": True}
                                                if kind == "clip" and size != native else {})
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = model.to(self.device, dtype=self.dtype).eval()

    def __repr__(self) -> str:
        return (f"TransformersBackbone({self.name!r}, {self.source!r}, device={self.device!r}, "
                f"image_size={self.image_size})")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def _pixel_values(self, batch: Sequence[np.ndarray]):
        import torch

        size = (self.image_size, self.image_size)
        arrays = []
        for image in batch:
            interpolation = cv2.INTER_AREA if image.shape[0] * image.shape[1] > size[0] * size[1] else cv2.INTER_CUBIC
            resized = cv2.resize(image, size, interpolation=interpolation).astype(np.float32) / 255.0
            arrays.append(((resized - self._mean) / self._std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays)).to(self.device, dtype=self.dtype)

    def _run(self, images: Sequence[np.ndarray], want: str) -> np.ndarray:
        import torch

        batch = check_images(images)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                pixels = self._pixel_values(batch[start:start + self.batch_size])
                result = self.model(pixel_values=pixels, **self._forward_kwargs)
                if want == "patches":
                    tokens = result.last_hidden_state[:, self.num_prefix_tokens:, :]
                    gh, gw = self.grid
                    if tokens.shape[1] != gh * gw:
                        raise RuntimeError(f"{self.name}: expected {gh * gw} patch tokens for a "
                                           f"{self.image_size} px input, got {tokens.shape[1]}")
                    outputs.append(tokens.reshape(tokens.shape[0], gh, gw, -1).float().cpu().numpy())
                else:
                    outputs.append(result.pooler_output.float().cpu().numpy())
        return np.concatenate(outputs).astype(np.float32)

    def patch_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 ``[N, gh, gw, hidden]``: last-layer patch tokens on the grid."""
        return self._run(images, "patches")

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 ``[N, hidden]``: the pooled CLS token, L2-normalised."""
        return _l2_normalise(self._run(images, "pooled"))


BACKBONES = ("classic", "dinov2", "clip")


def load_backbone(name: str = "classic", path: str | os.PathLike | None = None, device: str = "auto",
                  **kw: Any) -> Backbone:
    """A backbone by name: ``classic`` (no weights), ``dinov2`` or ``clip``.

    ``path`` is a local folder with the weights, or a hub name already in the local cache
    (default ``facebook/dinov2-small`` / ``openai/clip-vit-base-patch16``); nothing is ever
    downloaded. Extra keywords go to the backbone (``work_size`` for classic; ``image_size``,
    ``batch_size`` for transformers). Raises :class:`WeightsNotFoundError` naming the model and
    how to get it when the weights are not on disk.
    """
    key = name.strip().lower()
    if key == "classic":
        if path is not None:
            raise ConfigError("the classic backbone needs no weights; drop --backbone-path or "
                              "choose --backbone dinov2 / clip")
        return ClassicBackbone(**kw)
    if key not in DEFAULT_MODELS:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    return TransformersBackbone(key, os.fspath(path) if path is not None else DEFAULT_MODELS[key],
                                device=device, **kw)
