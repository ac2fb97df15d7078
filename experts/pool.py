"""Fitted experts cached per reference set, so each set is fitted once, and patch features
cached per reference image, so an image shared by several sets is encoded once."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from anomalyclaw.cache import LRUCache

from .backbones import Backbone, load_backbone
from .base import Expert
from .patchknn import PatchKNNExpert
from .subspace import SubspaceExpert

#: Expert names as tools and records use them.
EXPERTS: dict[str, type[Expert]] = {PatchKNNExpert.name: PatchKNNExpert, SubspaceExpert.name: SubspaceExpert}
#: The expert whose score and map the agent reads by default (the direct branch's offline
#: glance, the fused expert term, the map tools): patch nearest neighbours.
DEFAULT_EXPERT = PatchKNNExpert.name
#: The experts whose scores the fusion's expert term averages (each as a z-score against the
#: item's references' leave-one-out scores): patch nearest neighbours and the PCA subspace.
FUSION_EXPERTS = (PatchKNNExpert.name, SubspaceExpert.name)
#: Positional search radius (patch cells) for patch kNN on aligned domains.
ALIGNED_RADIUS = 1


def default_params(name: str, traits: Iterable[str] = ()) -> dict[str, Any]:
    """Constructor keywords for expert ``name`` on an item with these domain ``traits``.

    On aligned domains (fixed-pose objects, bi-temporal pairs) patch kNN compares a patch
    only with what the references hold within one cell of the same place: a missing or moved
    part leaves background that exists elsewhere in the references, so a free search cannot
    see it. It hurts unaligned domains, hence only for ``aligned`` (the README's expert table
    gives the figures; ``anomalyclaw bench experts --positional off`` measures them).
    """
    if name == PatchKNNExpert.name and "aligned" in set(traits):
        return {"positional_radius": ALIGNED_RADIUS}
    return {}


class _FittedSet:
    """One reference set's patch features ``[R, gh, gw, D]``, its images' ids (None when they
    cannot be told apart) and the experts fitted on them."""

    def __init__(self, features: np.ndarray, ids: list[tuple] | None = None):
        self.features = features
        self.ids = ids
        self.experts: dict[tuple, Expert] = {}
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:  # what the set holds, for the cache's byte count
        return int(self.features.nbytes)


class ExpertPool:
    """Fitted experts cached per reference set (thread-safe; each set fitted once).

    The backbone is loaded on first use. A reference set is identified by ``reference_key``: one
    entry per image, its path or, as :class:`~anomalyclaw.tools.item_context.ItemContext` passes
    it, its (path, mtime, size), so that a file rewritten in place is a new image; its patch
    features are computed once
    and shared by every expert fitted on it. At most ``max_sets`` sets are kept, least
    recently used first out. Two threads asking for the same set wait for one computation.

    Benchmarks draw reference sets from a small pool of normal images, so sets differ while
    their images repeat: each image's features are also kept, keyed by its entry and shape, up to
    ``max_feature_mb`` (least recently used out), and a new set only encodes the images it does
    not share (``anomalyclaw bench`` reports how often that happens on CrossDomainVAD-12). The
    leave-one-out calibration of a fit is built from per-image and per-image-pair parts (patch
    kNN: nearest-neighbour distances between two references; PCA subspace: each image's
    moments), kept up to ``max_held_out_mb``, so a new set computes only the pairs it does not
    share; 0 turns that off (each set then computes all its pairs). ``held_out="direct"`` fits
    every expert with the original leave-one-out method instead (a refit or search per held-out
    reference, nothing shared): the baseline ``anomalyclaw bench`` compares with.
    """

    def __init__(self, backbone: str | Backbone = "classic", *, max_sets: int = 64,
                 backbone_path: str | None = None, device: str = "auto", max_feature_mb: float = 1024.0,
                 max_held_out_mb: float = 256.0, held_out: str = "shared"):
        if max_sets < 1:
            raise ValueError(f"max_sets must be >= 1, got {max_sets}")
        if max_feature_mb < 0:
            raise ValueError(f"max_feature_mb must be >= 0, got {max_feature_mb}")
        if max_held_out_mb < 0:
            raise ValueError(f"max_held_out_mb must be >= 0, got {max_held_out_mb}")
        if held_out not in ("shared", "direct"):
            raise ValueError(f"held_out must be 'shared' or 'direct', got {held_out!r}")
        self.held_out = held_out
        self.max_sets = max_sets
        self.max_feature_bytes = int(max_feature_mb * 2**20)
        self.backbone_path = backbone_path
        self.device = device
        self._backbone_spec = backbone
        self._backbone: Backbone | None = None if isinstance(backbone, str) else backbone
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._fit_seconds = 0.0
        #: One entry per reference set: its patch features and the experts fitted on them.
        self._sets: LRUCache[tuple[str, ...], _FittedSet] = LRUCache("experts.reference_sets", max_items=max_sets)
        #: Patch features of single reference images, by (path, image shape).
        self._image_features: LRUCache[tuple[str, tuple[int, ...]], np.ndarray] = LRUCache(
            "experts.image_features", max_bytes=self.max_feature_bytes)
        #: Leave-one-out parts per image and image pair (see the class docstring).
        self._held_out_parts: LRUCache[tuple, Any] | None = LRUCache(
            "experts.held_out", max_bytes=int(max_held_out_mb * 2**20)) if max_held_out_mb > 0 else None

    @property
    def backbone(self) -> Backbone:
        """The shared backbone, loaded (once, under the lock) on first use."""
        with self._lock:
            if self._backbone is None:
                self._backbone = load_backbone(str(self._backbone_spec), self.backbone_path, self.device)
            return self._backbone

    def expert(self, name: str, reference_key: Sequence[Hashable],
               reference_images: Callable[[], Sequence[np.ndarray]], **params: Any) -> Expert:
        """The expert ``name`` ("anomaly_vfm" or "subspace_ad") fitted on the reference set.

        ``reference_images`` is called only when the set's features are not cached yet.
        ``params`` go to the expert's constructor (e.g. ``positional_radius=2``) and are part
        of the cache key.
        """
        expert_class = EXPERTS.get(name)
        if expert_class is None:
            raise ValueError(f"unknown expert {name!r}; choose one of {sorted(EXPERTS)}")
        key = _set_key(reference_key)
        if not key:
            raise ValueError("reference_key is empty: an expert needs at least one reference image")
        backbone = self.backbone
        entry = self._sets.get_or_compute(key, lambda: self._new_set(key, reference_images(), backbone))
        if self.held_out == "direct":
            params = {**params, "held_out": "direct"}
        expert_key = (name, tuple(sorted(params.items())))
        with entry.lock:  # fits on one set wait for each other; other sets fit meanwhile
            fitted = entry.experts.get(expert_key)
            if fitted is not None:
                with self._lock:
                    self._hits += 1
                return fitted
            start = time.perf_counter()
            store = self._held_out_parts if self.held_out == "shared" else None
            fitted = entry.experts[expert_key] = expert_class(backbone, **params).fit_features(
                entry.features, backbone=backbone, reference_ids=entry.ids, store=store)
            with self._lock:
                self._misses += 1
                self._fit_seconds += time.perf_counter() - start
            return fitted

    def image_features(self, reference_key: Sequence[Hashable],
                       reference_images: Callable[[], Sequence[np.ndarray]]) -> np.ndarray:
        """``[N, gh, gw, D]`` patch features of the images named by ``reference_key`` (one entry each),
        from the per-image cache; ``reference_images`` is called only when one is missing."""
        key = _set_key(reference_key)
        backbone = self.backbone
        entry = self._sets.get(key)
        if entry is not None:
            return entry.features
        images = list(reference_images())
        return self._features(images, backbone, _image_ids(key, images))

    def _new_set(self, key: tuple[Hashable, ...], images: Sequence[np.ndarray], backbone: Backbone) -> _FittedSet:
        images = list(images)
        ids = _image_ids(key, images)
        return _FittedSet(self._features(images, backbone, ids), ids)

    def _features(self, images: Sequence[np.ndarray], backbone: Backbone,
                  keys: list[tuple[Hashable, tuple[int, ...]]] | None) -> np.ndarray:
        """``[N, gh, gw, D]`` patch features of a set, encoding only the images not cached
        (``keys``: :func:`_image_ids`; None encodes them all)."""
        images = list(images)
        if keys is None:  # no way to tell which image is which: encode them all
            return backbone.patch_features(images)
        found = {k: v for k in keys if (v := self._image_features.get(k)) is not None}
        missing = sorted({keys.index(k) for k in keys if k not in found})
        if missing:
            fresh = backbone.patch_features([images[i] for i in missing])
            for j, i in enumerate(missing):
                found[keys[i]] = self._image_features.put(keys[i], np.ascontiguousarray(fresh[j]).copy())
        return np.stack([found[k] for k in keys])

    @property
    def stats(self) -> dict[str, Any]:
        """``{"hits", "misses", "fit_seconds", "sets", "image_hits", "image_misses", "images",
        "held_out_hits", "held_out_misses"}``: lookups served from the fitted-expert cache, fits
        done (features included), seconds spent fitting, reference sets held now; reference
        images whose features were reused or computed, and images held now; leave-one-out parts
        (image pairs, image moments) reused or computed."""
        images = self._image_features.stats()
        held = self._held_out_parts.stats() if self._held_out_parts is not None else {"hits": 0, "misses": 0}
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "fit_seconds": round(self._fit_seconds, 4),
                    "sets": len(self._sets), "image_hits": images["hits"], "image_misses": images["misses"],
                    "images": images["items"], "held_out_hits": held["hits"], "held_out_misses": held["misses"]}


_DEFAULT_POOLS: dict[tuple[str, str | None, str], ExpertPool] = {}
_DEFAULT_POOLS_LOCK = threading.Lock()


def default_pool(backbone: str = "classic", backbone_path: str | None = None, device: str = "auto") -> ExpertPool:
    """The process-wide pool for a backbone (one per backbone, path and device), so that every
    run, context and tool in a process shares its fits and features."""
    key = (backbone, backbone_path, device)
    with _DEFAULT_POOLS_LOCK:
        if key not in _DEFAULT_POOLS:
            _DEFAULT_POOLS[key] = ExpertPool(backbone, backbone_path=backbone_path, device=device)
        return _DEFAULT_POOLS[key]


def _set_key(reference_key: Sequence[Hashable]) -> tuple[Hashable, ...]:
    """A reference set's cache key: file keys (tuples) as given, paths as strings."""
    return tuple(k if isinstance(k, tuple) else str(k) for k in reference_key)


def _image_ids(key: Sequence[Hashable], images: Sequence[np.ndarray]) -> list[tuple[Hashable, tuple[int, ...]]] | None:
    """Each image's cache key (its entry of the set's key, and its shape), or None when ``key``
    does not name every image one to one (then nothing can be cached per image)."""
    if len(images) != len(key):
        return None
    return [(k, tuple(np.shape(im))) for k, im in zip(key, images)]

