"""The item under judgment as tools see it: images at work size, reference ranking, expert results.

The runner builds one :class:`ItemContext` per item from the manifest and passes it in the tool
call's config (``config["configurable"][CONTEXT_KEY]``); nothing a model writes can point a tool
at a file. Everything is lazy and cached: per item on the context, and per reference file, pair and set in
process-wide :class:`~anomalyclaw.cache.LRUCache` instances (reference images, calibrations),
because many items share references and the references' own variation is what every tool
calibrates against.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import cv2
import numpy as np

from anomalyclaw.cache import LRUCache
from anomalyclaw.domains import DomainCard
from anomalyclaw.imaging import load_image, resize_longest, resize_to
from anomalyclaw.items import Item

from .imageops import to_gray, to_smooth_lab

#: Pixels around a box that :meth:`ItemContext.lab_box` converts with it: more than the reach of
#: the sigma-1 blur of :meth:`ItemContext.lab` (OpenCV's float kernel: 4 px each side).
LAB_BLUR_REACH = 6

if TYPE_CHECKING:
    from anomalyclaw.experts.base import ExpertResult
    from anomalyclaw.experts.released import ReleasedScoreCache
    from anomalyclaw.experts.pool import ExpertPool

CONTEXT_KEY = "item_context"
#: Longest side of the full-resolution query kept for zooming (pixels).
ZOOM_SOURCE_SIDE = 1536
#: Side of the thumbnails behind the cheap global similarity (pixels).
_THUMB_SIDE = 32

T = TypeVar("T")


#: Reference images at work size, keyed by (path, mtime, size, work_side): ~0.8 MB each at 512 px.
_REFERENCE_IMAGES = LRUCache("tools.reference_images", max_items=128)
#: A few references at zoom resolution (up to 1536 px: ~7 MB each).
_REFERENCE_FULL = LRUCache("tools.reference_full", max_items=8)
#: Values computed from one reference file (its Lab, grey, spectrum...), shared by every set that
#: holds the file: up to ~3 MB each at 512 px.
_REFERENCE_FILES = LRUCache("tools.reference_files", max_items=192)
#: Calibrations that depend on the whole reference set (baselines, tile banks, embeddings).
_REFERENCE_SETS = LRUCache("tools.reference_sets", max_items=64)
#: Calibrations of one ordered pair of reference files (a registered difference map), so items
#: that draw different subsets from one reference pool share them: float16, <= 200 KB each.
_REFERENCE_PAIRS = LRUCache("tools.reference_pairs", max_items=256)
#: Layout descriptors of single reference files (12 KB each), so a new reference set ranks its
#: references without describing the images it shares with sets seen before.
_REFERENCE_THUMBNAILS = LRUCache("tools.reference_thumbnails", max_items=4096)


def _file_key(path: Path) -> tuple[str, float, int]:
    try:
        st = path.stat()
        return str(path), st.st_mtime, st.st_size
    except OSError:
        return str(path), 0.0, -1


def thumbnail_descriptor(image: np.ndarray) -> np.ndarray:
    """A cheap layout descriptor: a blurred 32x32 Lab thumbnail, zero-mean and unit-norm per
    channel, flattened to float32 [3*32*32]. Dot products of two descriptors (divided by 3) are
    normalized cross-correlations in [-1, 1] of the images' coarse layouts."""
    small = cv2.resize(image, (_THUMB_SIDE, _THUMB_SIDE), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    lab = cv2.GaussianBlur(lab, (0, 0), 1.0)
    chans = []
    for c in range(3):
        v = lab[:, :, c].ravel() - lab[:, :, c].mean()
        n = float(np.linalg.norm(v))
        # A flat channel (grey image's a*/b*) carries no layout: leave it at zero.
        chans.append(v / n if n > 1e-3 * v.size ** 0.5 else np.zeros_like(v))
    return np.concatenate(chans).astype(np.float32)


class ItemContext:
    """Everything a tool may read about the item under judgment.

    Built by the runner from the manifest, never from the model's arguments. ``query`` and
    ``references`` are ``H x W x 3`` uint8 RGB arrays with the longer side at most ``work_side``
    (never upscaled); loading errors surface as :class:`~anomalyclaw.errors.ImageLoadError`.
    """

    def __init__(self, item: Item, *, work_side: int = 512, expert_pool: "ExpertPool | None" = None,
                 score_cache: "ReleasedScoreCache | None" = None, backbone: Any = None):
        if work_side < 32:
            raise ValueError(f"work_side must be at least 32 px, got {work_side}")
        self.item = item
        self.card: DomainCard = item.domain_card
        self.traits: frozenset[str] = item.traits
        self.work_side = int(work_side)
        self.expert_pool = expert_pool
        self.score_cache = score_cache
        self.backbone = backbone
        self._query: np.ndarray | None = None
        self._query_full: np.ndarray | None = None
        self._references: dict[int, np.ndarray] = {}
        self._aligned: dict[int, np.ndarray] = {}
        self._ranking: list[tuple[int, float]] | None = None
        self._memo: dict[Any, Any] = {}
        self._computing: dict[Any, threading.Lock] = {}
        self._file_keys: dict[int, tuple[str, float, int]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ItemContext(item_id={self.item.item_id!r}, domain={self.item.domain_code!r}, "
                f"n_refs={self.n_references}, work_side={self.work_side})")

    # ------------------------------------------------------------------------------ images
    @property
    def query(self) -> np.ndarray:
        """The query at work size, H x W x 3 uint8."""
        if self._query is None:
            self._query = resize_longest(self.query_full, self.work_side)
        return self._query

    @property
    def query_full(self) -> np.ndarray:
        """The query at up to :data:`ZOOM_SOURCE_SIDE` px (for zooming into detail); one decode
        of the file serves both this and :attr:`query`."""
        if self._query_full is None:
            self._query_full = load_image(self.item.query_path, max_side=max(ZOOM_SOURCE_SIDE, self.work_side))
        return self._query_full

    @property
    def n_references(self) -> int:
        return len(self.item.ref_paths)

    def reference_file_key(self, index: int) -> tuple[str, float, int]:
        """(path, mtime, size) of reference ``index``: what the process-wide caches key its
        values by (a file edited in place gets new ones). Read once per item."""
        key = self._file_keys.get(index)
        if key is None:
            key = self._file_keys[index] = _file_key(Path(self.item.ref_paths[index]))
        return key

    def reference_set_file_key(self) -> tuple[tuple[str, float, int], ...]:
        """Every reference's :meth:`reference_file_key`: what the reference-set caches (the expert
        pool's fits, :meth:`reference_cached`) key the set by."""
        return tuple(self.reference_file_key(i) for i in range(self.n_references))

    def reference(self, index: int) -> np.ndarray:
        """Reference ``index`` at work size (cached across items that share the file)."""
        if index not in self._references:
            path = Path(self.item.ref_paths[index])
            key = (*self.reference_file_key(index), self.work_side)
            self._references[index] = _REFERENCE_IMAGES.get_or_compute(
                key, lambda: load_image(path, max_side=self.work_side))
        return self._references[index]

    @property
    def references(self) -> list[np.ndarray]:
        """All references at work size."""
        return [self.reference(i) for i in range(self.n_references)]

    def reference_aligned(self, index: int) -> np.ndarray:
        """Reference ``index`` resized to the query's exact H x W (no registration)."""
        if index not in self._aligned:
            self._aligned[index] = resize_to(self.reference(index), self.query.shape[:2])
        return self._aligned[index]

    def image(self, index: int | None = None) -> np.ndarray:
        """The query (``index`` None) or reference ``index`` resized to the query's shape."""
        return self.query if index is None else self.reference_aligned(index)

    def lab(self, index: int | None = None) -> np.ndarray:
        """:meth:`image` in Lab, lightly blurred (sigma 1 px) against noise: float32 H x W x 3,
        L in [0, 100]. Cached (per item for the query, per reference set for references)."""
        if index is None:
            return self.item_cached("lab", lambda: to_smooth_lab(self.query))
        return self.reference_file_cached(index, "lab",
                                          lambda: to_smooth_lab(self.reference_aligned(index)))

    def gray(self, index: int | None = None) -> np.ndarray:
        """:meth:`image` as float32 grey in [0, 1]. Cached like :meth:`lab`."""
        if index is None:
            return self.item_cached("gray", lambda: to_gray(self.query))
        return self.reference_file_cached(index, "gray", lambda: to_gray(self.reference_aligned(index)))

    def lab_box(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """``lab()[y0:y1, x0:x1]`` of the query for a pixel ``box`` (exclusive ends): the same
        numbers (the blur's vector and scalar loops may round a last bit apart), converted from
        the box and the blur's reach around it unless the whole image's Lab is cached already (a
        tool that reads one box of the query need not convert it all)."""
        return self._query_box("lab", box, LAB_BLUR_REACH, to_smooth_lab)

    def gray_box(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """``gray()[y0:y1, x0:x1]`` of the query, converted from the box alone unless cached."""
        return self._query_box("gray", box, 0, to_gray)

    def _query_box(self, name: str, box: tuple[int, int, int, int], reach: int,
                   convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        x0, y0, x1, y1 = (int(v) for v in box)
        with self._lock:
            whole = self._memo.get(name)
        if whole is not None:
            return whole[y0:y1, x0:x1]
        # A per-pixel conversion and a blur of radius < reach: inside the box, the crop's result
        # is the whole image's (where the crop's edge is the image's, both reflect the same way).
        h, w = self.query.shape[:2]
        a0, b0, a1, b1 = max(0, x0 - reach), max(0, y0 - reach), min(w, x1 + reach), min(h, y1 + reach)
        return convert(self.query[b0:b1, a0:a1])[y0 - b0:y1 - b0, x0 - a0:x1 - a0]

    def reference_full(self, index: int) -> np.ndarray:
        """Reference ``index`` resized to the shape of :attr:`query_full` (for zoom crops)."""
        path = Path(self.item.ref_paths[index])
        side = max(ZOOM_SOURCE_SIDE, self.work_side)
        full = _REFERENCE_FULL.get_or_compute((*self.reference_file_key(index), side),
                                              lambda: load_image(path, max_side=side))
        return resize_to(full, self.query_full.shape[:2])

    def preload(self) -> "ItemContext":
        """Load the query and every reference at work size now (so later tool timings exclude
        disk I/O; zoom's full-resolution reference is still read on demand)."""
        _ = self.query
        _ = self.references
        return self

    # ------------------------------------------------------------------- reference set caches
    def reference_cached(self, name: str, compute: Callable[[], T], *, shape: tuple[int, ...] | None = None) -> T:
        """Memoise ``compute()`` for this reference set at this work size (and ``shape`` when the
        value depends on the query's shape), shared by every item that has the same references."""
        key = (self.reference_set_file_key(), self.work_side, name, tuple(shape) if shape else None)
        return _REFERENCE_SETS.get_or_compute(key, compute)

    def item_cached(self, key: Any, compute: Callable[[], T]) -> T:
        """Memoise ``compute()`` on this item (e.g. a difference map that several tools read);
        two threads asking for one key compute it once."""
        with self._lock:
            if key in self._memo:
                return self._memo[key]
            gate = self._computing.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._memo:
                    return self._memo[key]
            value = compute()
            with self._lock:
                self._computing.pop(key, None)
                return self._memo.setdefault(key, value)

    def reference_file_cached(self, index: int, name: str, compute: Callable[[], T]) -> T:
        """Memoise ``compute()`` for reference ``index`` (by file, at the query's shape), shared by
        every item whose references include that file."""
        key = (self.reference_file_key(index), self.work_side, name, tuple(self.query.shape))
        return _REFERENCE_FILES.get_or_compute(key, compute)

    def reference_pair_cached(self, moving: int, fixed: int, name: str, compute: Callable[[], T]) -> T:
        """Memoise ``compute()`` for an ordered pair of references (by file) at the query's shape."""
        key = (self.reference_file_key(moving), self.reference_file_key(fixed), self.work_side, name,
               tuple(self.query.shape))
        return _REFERENCE_PAIRS.get_or_compute(key, compute)

    def _reference_thumbnails(self) -> np.ndarray:
        """``[R, 3072]``: each reference's :func:`thumbnail_descriptor`, computed once per file."""
        return np.stack([_REFERENCE_THUMBNAILS.get_or_compute(
            (self.reference_file_key(i), self.work_side), lambda i=i: thumbnail_descriptor(self.reference(i)))
            for i in range(self.n_references)])

    def reference_ranking(self) -> list[tuple[int, float]]:
        """References ordered from most to least similar to the query, as (index, similarity):
        normalized cross-correlation in [-1, 1] of blurred 32x32 Lab thumbnails (coarse layout
        and colour; cheap next to any tool)."""
        if self._ranking is None:
            if self.n_references == 0:
                self._ranking = []
            else:
                sims = self._reference_thumbnails() @ thumbnail_descriptor(self.query) / 3.0
                order = np.argsort(-sims, kind="stable")
                self._ranking = [(int(i), float(sims[i])) for i in order]
        return self._ranking

    def closest_reference_index(self) -> int:
        """Index of the reference whose coarse layout and colour best match the query."""
        ranking = self.reference_ranking()
        if not ranking:
            raise ValueError(f"item {self.item.item_id} has no reference images")
        return ranking[0][0]

    def closest_references(self, n: int) -> list[int]:
        return [i for i, _ in self.reference_ranking()[:max(1, n)]]

    # --------------------------------------------------------------------------------- experts
    def get_expert_pool(self) -> "ExpertPool":
        """The pool passed in, else the process-wide classic pool (fits shared across items)."""
        if self.expert_pool is not None:
            return self.expert_pool
        from anomalyclaw.experts.pool import default_pool

        return default_pool()

    def get_backbone(self) -> Any:
        """The backbone passed in, else the weight-free classic backbone (for embeddings)."""
        if self.backbone is not None:
            return self.backbone
        from anomalyclaw.experts.pool import default_pool

        return default_pool().backbone

    def expert_result(self, name: str) -> "ExpertResult":
        """The query scored by expert ``name`` ("anomaly_vfm" or "subspace_ad"), fitted on this
        item's references through the pool; computed once per item (two branches asking at once
        wait for one computation)."""
        def compute() -> "ExpertResult":
            from anomalyclaw.experts.pool import default_params

            start = time.perf_counter()
            pool = self.get_expert_pool()
            expert = pool.expert(name, self.reference_set_file_key(), lambda: self.references,
                                 **default_params(name, self.traits))
            return expert.score_features(self.query_features(pool.backbone), self.query.shape[:2], started=start)

        return self.item_cached(("expert_result", name), compute)

    def query_features(self, backbone: Any) -> np.ndarray:
        """The query's patch features ``[gh, gw, D]`` from ``backbone``, computed once per item
        (every expert and the retriever read them)."""
        return self.item_cached(("query_features", id(backbone)),
                                lambda: np.asarray(backbone.patch_features([self.query])[0], np.float32))

    def reference_features(self, backbone: Any) -> np.ndarray:
        """``[R, gh, gw, D]`` patch features of the references from ``backbone``, each image's
        computed once for the run (the expert pool's per-image cache, when the pool holds this
        backbone)."""
        pool = self.get_expert_pool()
        if pool.backbone is backbone:
            return pool.image_features(self.reference_set_file_key(), lambda: self.references)
        return np.asarray(backbone.patch_features(self.references), np.float32)

    def has_expert_result(self, name: str) -> bool:
        with self._lock:
            return ("expert_result", name) in self._memo
