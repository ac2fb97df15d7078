"""The expert interface: fit on normal reference images, score a query into a score and a map.

An expert follows scikit-learn's estimator shape (``get_params``, no work in ``__init__``,
learned state in attributes ending in ``_``). Subclasses supply two things: how to build a
model of the reference patches, and how to score patches against it. This base class turns
that into an image score (mean of the top ``top_fraction`` patch scores), a smoothed
``anomaly_map`` at the query's own size, and a leave-one-out calibration: every reference is
scored against the model of the *other* references, so a query's raw score can also be read
as a rank among normal images (``rank`` in [0, 1]) without knowing the scale.
"""
from __future__ import annotations

import math
import time
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable, Sequence

import cv2
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from anomalyclaw.scores import logistic

from .backbones import Backbone, check_images, load_backbone

#: The z-score's spread is at least this fraction of the references' mean score: with a few
#: references that score alike, their standard deviation alone would blow small differences
#: up into certainties.
MIN_RELATIVE_SPREAD = 0.05


@dataclass
class ExpertResult:
    """One query scored by one expert.

    ``score`` is in the expert's own units (higher = more anomalous); ``rank`` is the fraction
    of the references' leave-one-out scores strictly below it, so 1.0 means "more unusual than
    every normal reference". ``anomaly_map`` is float32 ``[H, W]`` at the query's size, in the
    same units as the patch scores; ``patch_map`` is the raw float32 ``[gh, gw]`` grid.
    """

    expert: str
    score: float
    rank: float
    anomaly_map: np.ndarray
    patch_map: np.ndarray
    reference_scores: np.ndarray
    threshold: float
    elapsed_s: float
    normal_range: tuple[float, float] = (0.0, 1.0)
    """(typical normal patch score, ``threshold``): pass to ``maps.normalize_map`` so that 0 is
    an ordinary normal patch and 1 as unusual as the worst normal reference."""

    @property
    def above_threshold(self) -> bool:
        """True when the query scores above every reference's leave-one-out score."""
        return self.score > self.threshold

    def z_score(self) -> float | None:
        """The image score's z-score against the references' own leave-one-out scores: 0 is a
        typical reference, 1 one spread above them (the spread is at least
        ``MIN_RELATIVE_SPREAD`` of their mean, so a few alike references do not blow small
        differences up). None when the score is not finite or there are no reference scores."""
        refs = np.asarray(self.reference_scores, dtype=float)
        if not math.isfinite(float(self.score)) or refs.size == 0:
            return None
        spread = float(refs.std()) if refs.size > 1 else 0.0
        spread = max(spread, MIN_RELATIVE_SPREAD * abs(float(refs.mean())), 1e-6)
        return (float(self.score) - float(refs.mean())) / spread

    def unit_score(self) -> float | None:
        """The image score as a probability-like value in [0, 1]: the logistic of
        :meth:`z_score`, so 0.5 is a typical reference and values near 1 lie far above every
        reference. ``rank`` when there are no reference scores; None when the score is not
        finite."""
        if not math.isfinite(float(self.score)):
            return None
        z = self.z_score()
        return float(self.rank) if z is None else logistic(z)

    def summary(self) -> dict[str, Any]:
        """The scalars, JSON-ready (no arrays), for records and tool observations."""
        peak_row, peak_col = np.unravel_index(int(np.argmax(self.patch_map)), self.patch_map.shape)
        gh, gw = self.patch_map.shape
        return {
            "expert": self.expert, "score": round(self.score, 6), "rank": round(self.rank, 4),
            "threshold": round(self.threshold, 6), "above_threshold": self.above_threshold,
            "n_references": int(self.reference_scores.size),
            "reference_score_range": [round(float(self.reference_scores.min()), 6),
                                      round(float(self.reference_scores.max()), 6)],
            "peak_xy": [round((peak_col + 0.5) / gw, 4), round((peak_row + 0.5) / gh, 4)],
            "elapsed_s": round(self.elapsed_s, 4),
        }


def holdout_groups(n_references: int, grid: tuple[int, int]) -> np.ndarray:
    """int ``[n_references, gh, gw]``: which held-out group each reference patch belongs to.

    With two or more references a group is one image (leave one image out). A single
    reference has no other image to be compared with, so its four quadrants are the groups:
    each quadrant is scored against a model of the other three, a weaker but honest scale.
    """
    gh, gw = grid
    if n_references >= 2:
        return np.broadcast_to(np.arange(n_references)[:, None, None], (n_references, gh, gw)).copy()
    rows = (np.arange(gh) >= gh // 2).astype(int)[:, None]
    cols = (np.arange(gw) >= gw // 2).astype(int)[None, :]
    return (2 * rows + cols)[None]


class Expert(BaseEstimator, metaclass=ABCMeta):
    """Base class: a frozen backbone plus a model of normal patches.

    Parameters common to all experts: ``backbone`` (a :class:`Backbone`, a backbone name, or
    None for ``classic``), ``top_fraction`` (the image score is the mean of this fraction of
    the highest patch scores; at least one patch) and ``smoothing`` (Gaussian sigma of the
    anomaly map, in patch cells).
    """

    name: ClassVar[str] = "expert"

    def __init__(self, backbone: Backbone | str | None = None, *, top_fraction: float = 0.01,
                 smoothing: float = 0.5):
        self.backbone = backbone
        self.top_fraction = top_fraction
        self.smoothing = smoothing

    # -- what subclasses implement -------------------------------------------------------------

    @abstractmethod
    def _fit_model(self, reference_features: np.ndarray, reference_ids: Sequence[Hashable] | None = None,
                   store: Any = None) -> None:
        """Build the model of normal patches from float32 ``[R, gh, gw, D]``; set ``*_``
        (``reference_ids`` and ``store``: see :meth:`_held_out_patch_scores`)."""

    @abstractmethod
    def _patch_scores(self, query_features: np.ndarray) -> np.ndarray:
        """float32 ``[gh, gw]`` scores of one query's ``[gh, gw, D]`` features."""

    @abstractmethod
    def _held_out_patch_scores(self, reference_features: np.ndarray, groups: np.ndarray,
                               reference_ids: Sequence[Hashable] | None = None, store: Any = None) -> np.ndarray:
        """float32 ``[R, gh, gw]``: each reference patch scored by a model built without the
        patches of its own group (see :func:`holdout_groups`). ``reference_ids`` (one per
        reference) and ``store`` (an :class:`~anomalyclaw.cache.LRUCache`), when given, let the
        expert keep what it computed per image or image pair for other sets with those images."""

    # -- fit -------------------------------------------------------------------------------------

    def _validate_params(self) -> None:
        if not 0.0 < float(self.top_fraction) <= 1.0:
            raise ValueError(f"{self.name}: top_fraction must be in (0, 1], got {self.top_fraction}")
        if float(self.smoothing) < 0:
            raise ValueError(f"{self.name}: smoothing must be >= 0 patch cells, got {self.smoothing}")

    def _resolve_backbone(self) -> Backbone:
        if self.backbone is None:
            return load_backbone("classic")
        if isinstance(self.backbone, str):
            return load_backbone(self.backbone)
        return self.backbone

    def fit(self, reference_images: Sequence[np.ndarray]) -> "Expert":
        """Fit on normal reference images (each H x W x 3 uint8 RGB, any sizes)."""
        images = check_images(reference_images, "reference_images")
        backbone = self._resolve_backbone()
        return self.fit_features(backbone.patch_features(images), backbone=backbone)

    def fit_features(self, reference_features: np.ndarray, *, backbone: Backbone | None = None,
                     reference_ids: Sequence[Hashable] | None = None, store: Any = None) -> "Expert":
        """Fit on precomputed reference features float32 ``[R, gh, gw, D]`` (from ``backbone``,
        which must be the one that will embed queries; default: this expert's own).

        ``reference_ids`` name the reference images (the same image, the same id) and ``store``
        is a cache shared by the fits of one backbone: the leave-one-out calibration then reuses
        what earlier sets computed for the same images (see :class:`ExpertPool`)."""
        self._validate_params()
        features = np.asarray(reference_features, dtype=np.float32)
        if features.ndim != 4 or features.shape[0] < 1 or min(features.shape[1:]) < 1:
            raise ValueError(f"{self.name}: reference features must be [R, gh, gw, D] with R >= 1, "
                             f"got shape {features.shape}")
        if features.shape[0] == 1 and min(features.shape[1:3]) < 2:
            raise ValueError(f"{self.name}: one reference needs a grid of at least 2 x 2 patches "
                             f"for its held-out quadrants, got {features.shape[1:3]}")
        start = time.perf_counter()
        self.backbone_ = backbone if backbone is not None else self._resolve_backbone()
        self.grid_ = tuple(int(s) for s in features.shape[1:3])
        self.n_features_in_ = int(features.shape[3])
        self.n_references_ = int(features.shape[0])
        self._fit_model(features, reference_ids, store)
        groups = holdout_groups(self.n_references_, self.grid_)
        held_out = self._held_out_patch_scores(features, groups, reference_ids, store)
        self.reference_patch_maps_ = held_out.astype(np.float32)
        self.reference_scores_ = np.array([self.image_score(m) for m in held_out], dtype=np.float32)
        self.threshold_ = float(self.reference_scores_.max())
        self.normal_patch_score_ = float(np.median(held_out))
        self.fit_seconds_ = time.perf_counter() - start
        return self

    # -- score -----------------------------------------------------------------------------------

    def image_score(self, patch_map: np.ndarray) -> float:
        """Mean of the ``top_fraction`` highest patch scores (at least one patch)."""
        flat = np.asarray(patch_map, dtype=np.float64).ravel()
        k = max(1, int(round(float(self.top_fraction) * flat.size)))
        return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())

    def upsample(self, patch_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The patch map as float32 ``[H, W]``: bilinear upsampling and a Gaussian of
        ``smoothing`` patch cells, done at 4 px per cell and then resized, so the cost does not
        grow with the query's size."""
        fine = cv2.resize(patch_map.astype(np.float32), (4 * patch_map.shape[1], 4 * patch_map.shape[0]),
                          interpolation=cv2.INTER_LINEAR)
        if self.smoothing > 0:
            fine = cv2.GaussianBlur(fine, (0, 0), sigmaX=4.0 * float(self.smoothing),
                                    borderType=cv2.BORDER_REFLECT)
        return cv2.resize(fine, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)

    def score(self, query: np.ndarray) -> ExpertResult:
        """Score one query image (H x W x 3 uint8 RGB) against the fitted references."""
        start = time.perf_counter()
        check_is_fitted(self, "reference_scores_")
        image = check_images([query], "query")[0]
        features = self.backbone_.patch_features([image])[0]
        return self.score_features(features, image.shape[:2], started=start)

    def score_features(self, query_features: np.ndarray, shape: tuple[int, int], *,
                       started: float | None = None) -> ExpertResult:
        """Score precomputed query features float32 ``[gh, gw, D]``; the map gets ``shape``."""
        start = time.perf_counter() if started is None else started
        check_is_fitted(self, "reference_scores_")
        features = np.asarray(query_features, dtype=np.float32)
        if features.shape != self.grid_ + (self.n_features_in_,):
            raise ValueError(f"{self.name}: query features have shape {features.shape}, the "
                             f"references {self.grid_ + (self.n_features_in_,)}; use the same backbone")
        patch_map = self._patch_scores(features).astype(np.float32)
        value = self.image_score(patch_map)
        return ExpertResult(
            expert=self.name, score=value,
            rank=float(np.mean(self.reference_scores_ < value)),
            anomaly_map=self.upsample(patch_map, shape), patch_map=patch_map,
            reference_scores=self.reference_scores_.copy(), threshold=self.threshold_,
            elapsed_s=time.perf_counter() - start,
            normal_range=(self.normal_patch_score_, self.threshold_))
