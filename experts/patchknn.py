"""Patch nearest-neighbour expert (AnomalyDINO-style): a query patch is as anomalous as it is
far from its nearest reference patch."""
from __future__ import annotations

import threading
from typing import Any, Callable, ClassVar, Hashable, Sequence

import numpy as np

from .backbones import Backbone
from .base import Expert

#: Query rows per distance block. Rows are independent, so the block size changes no result.
_CHUNK = 256
#: Bank rows per distance block: 256 x 2048 float32 is a 2 MB block, which stays in a core's L2
#: cache for the minimum that follows; one block against a whole 10-image bank (10,240 patches,
#: 10 MB) spills to memory: 1.2-2x the CPU (``anomalyclaw bench``, "Nearest-neighbour search";
#: the most where the block's pages are new to the process). The blocks' minima are merged exactly.
BANK_TILE = 2048


_BLOCKS = threading.local()


def _block_out(rows: int, cols: int, device: Any) -> Any:
    """A float32 ``[rows, cols]`` tensor over this thread's reusable block storage, for a
    distance block's ``out=`` (None off the CPU: a GPU's caching allocator reuses its blocks).

    A fresh block on the CPU costs page faults: glibc hands a freed 2 MB block back to the kernel
    (the heap's top is trimmed), so the next one is faulted in and zeroed again, ~460 faults per
    block and ~340 per item of a run (``anomalyclaw bench profile`` prints the faults per item).
    Each thread keeps one buffer, grown to the largest block it has computed. Callers reduce a
    block before asking for the next one."""
    import torch

    if torch.device(device).type != "cpu":
        return None
    need = rows * cols
    buf = getattr(_BLOCKS, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _BLOCKS.buf = torch.empty(max(need, _CHUNK * BANK_TILE), dtype=torch.float32)
    return buf[:need].view(rows, cols)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Bank:
    """A patch bank ``[N, D]`` made ready for :func:`nearest_distances`: centred on its mean, cut
    into tiles of ``bank_tile`` rows (None: one tile) with their squared norms, on ``device``.
    An expert builds it once per fit, so an item's search allocates only its own blocks."""

    def __init__(self, bank: np.ndarray, device: str = "cpu", bank_tile: int | None = BANK_TILE, k: int = 1):
        import torch

        self.rows = int(bank.shape[0])
        tile = self.rows if bank_tile is None else max(int(bank_tile), int(k))
        with torch.inference_mode():
            bank_t = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(device)
            self.centre = bank_t.mean(dim=0, keepdim=True)
            bank_t = bank_t - self.centre
            bank_sq = (bank_t * bank_t).sum(dim=1)[None, :]
            self.tiles = [(bank_sq[:, c:c + tile], bank_t[c:c + tile].T) for c in range(0, self.rows, tile)]
        self.device = device


def nearest_distances(query: np.ndarray, bank: np.ndarray | Bank, k: int = 1, device: str = "cpu", *,
                      bank_tile: int | None = BANK_TILE) -> np.ndarray:
    """float32 ``[M]``: mean Euclidean distance of each query row ``[M, D]`` to its ``k``
    nearest rows of ``bank`` ``[N, D]`` (or a :class:`Bank` of them, whose device and tiles
    then stand for ``device`` and ``bank_tile``).

    One fused ``|b|^2 - 2 q.b`` matrix product per block of query rows and ``bank_tile`` bank
    rows (None: the whole bank; torch, on ``device``: the backbone's GPU when it has one, else
    the CPU); the blocks' ``k`` smallest are merged, and ``|q|^2`` is added after the minimum.
    Both sides are centred on the bank's mean first, which leaves distances unchanged but
    keeps float32 cancellation small.
    """
    import torch

    if not isinstance(bank, Bank):
        bank = Bank(bank, device, bank_tile, k)
    k = min(int(k), bank.rows)
    with torch.inference_mode():
        out = []
        for start in range(0, query.shape[0], _CHUNK):
            block = torch.from_numpy(np.ascontiguousarray(query[start:start + _CHUNK], dtype=np.float32))
            block = block.to(bank.device) - bank.centre
            parts = [_smallest(torch.addmm(sq, block, bt, alpha=-2.0, out=_block_out(block.shape[0], bt.shape[1], bank.device)),
                               min(k, bt.shape[1]), 1) for sq, bt in bank.tiles]
            nearest = parts[0] if len(parts) == 1 else _smallest(torch.cat(parts, dim=1), k, 1)
            squared = nearest + (block * block).sum(dim=1, keepdim=True)
            out.append(squared.clamp_min(0).sqrt().mean(dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def pair_nearest(a: np.ndarray, b: np.ndarray, k: int = 1, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Squared Euclidean distances of nearest neighbours between two images' patches, both ways,
    from one distance block: float32 ``[P, k]`` (each row of ``a`` ``[P, D]`` to its ``k``
    nearest rows of ``b`` ``[Q, D]``) and ``[Q, k]`` (``b`` to ``a``); ``k`` is capped by the
    other side's rows. Unsorted, not clamped at 0 (the caller takes square roots after merging).
    Both sides are centred on their joint mean first (float32 cancellation)."""
    import torch

    ka, kb = min(int(k), b.shape[0]), min(int(k), a.shape[0])
    with torch.inference_mode():
        a_t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        b_t = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(device)
        centre = (a_t.sum(dim=0, keepdim=True) + b_t.sum(dim=0, keepdim=True)) / (a.shape[0] + b.shape[0])
        a_t, b_t = a_t - centre, b_t - centre
        a_sq, b_sq = (a_t * a_t).sum(dim=1, keepdim=True), (b_t * b_t).sum(dim=1)[None, :]
        step = a.shape[0] if a.shape[0] * b.shape[0] <= _PAIR_BLOCK else _CHUNK
        rows, cols = [], None
        for start in range(0, a.shape[0], step):
            rows_a = a_t[start:start + step]
            block = torch.addmm(b_sq, rows_a, b_t.T, alpha=-2.0, out=_block_out(rows_a.shape[0], b_t.shape[0], device)
                                ).add_(a_sq[start:start + step])
            rows.append(_smallest(block, ka, dim=1))
            top = _smallest(block, kb, dim=0)
            cols = top if cols is None else _smallest(torch.cat([cols, top], dim=0), kb, dim=0)
        return torch.cat(rows).cpu().numpy(), cols.T.contiguous().cpu().numpy()


#: Pairs of images up to this many patch pairs (32 x 32 grids: 1024 x 1024) get one block.
_PAIR_BLOCK = 1 << 21


def _smallest(x: Any, k: int, dim: int) -> Any:
    """The ``k`` smallest values of ``x`` along ``dim`` (a torch tensor), unsorted."""
    if k == 1:
        return x.amin(dim=dim, keepdim=True)
    return x.topk(k, dim=dim, largest=False, sorted=False).values


def _smallest_np(x: np.ndarray, k: int, axis: int) -> np.ndarray:
    """:func:`_smallest` for an array: the min(``k``, size) smallest along ``axis``, unsorted."""
    k = min(k, x.shape[axis])
    return np.partition(x, k - 1, axis=axis).take(range(k), axis=axis) if k > 1 else x.min(axis=axis, keepdims=True)


def _root_mean(squared: np.ndarray, axis: int) -> np.ndarray:
    """float32 mean over ``axis`` of the distances whose squares are ``squared`` (negatives from
    float32 cancellation count as 0)."""
    return np.sqrt(np.maximum(squared, 0.0)).mean(axis=axis).astype(np.float32)


def positional_nearest(query: np.ndarray, references: np.ndarray, radius: int, k: int = 1) -> np.ndarray:
    """float32 ``[k', gh, gw]``: the ``k'`` = min(``k``, candidates) smallest squared distances
    of each query patch ``[gh, gw, D]`` to the patches of ``references`` ``[R, gh, gw, D]``
    within ``radius`` cells of its position (unsorted; ``inf`` where fewer candidates exist, not
    clamped at 0); :func:`positional_distances` is their root mean."""
    gh, gw, _ = query.shape
    query_sq = np.einsum("hwd,hwd->hw", query, query)
    reference_sq = np.einsum("rhwd,rhwd->rhw", references, references)
    candidates = []
    # Offsets beyond the grid have no overlap at all.
    reach_y, reach_x = min(radius, gh - 1), min(radius, gw - 1)
    for dy in range(-reach_y, reach_y + 1):
        for dx in range(-reach_x, reach_x + 1):
            # Query rows/cols whose shifted position stays on the grid.
            qy = slice(max(0, -dy), gh - max(0, dy))
            qx = slice(max(0, -dx), gw - max(0, dx))
            ry = slice(max(0, dy), gh - max(0, -dy))
            rx = slice(max(0, dx), gw - max(0, -dx))
            squared = np.full((references.shape[0], gh, gw), np.inf, np.float32)
            dot = np.einsum("hwd,rhwd->rhw", query[qy, qx], references[:, ry, rx])
            squared[:, qy, qx] = query_sq[qy, qx][None] + reference_sq[:, ry, rx] - 2.0 * dot
            candidates.append(squared)
    return _smallest_np(np.concatenate(candidates, axis=0), k, axis=0)


def positional_distances(query: np.ndarray, references: np.ndarray, radius: int, k: int = 1) -> np.ndarray:
    """float32 ``[gh, gw]``: for each query patch ``[gh, gw, D]``, the mean distance to its
    ``k`` nearest patches among the references ``[R, gh, gw, D]`` lying within ``radius``
    cells of the same grid position (for aligned images: a patch is compared only with what
    normally sits there)."""
    return _root_mean(positional_nearest(query, references, radius, k), axis=0)


def _merge_nearest(parts: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Root mean of the ``k`` smallest of per-pair candidates ``[P, k_j]`` (concatenated)."""
    return _root_mean(_smallest_np(np.concatenate(parts, axis=1), k, axis=1), axis=1)


class PatchKNNExpert(Expert):
    """Distance of each query patch to its nearest normal patch (AnomalyDINO, Damm et al. 2025).

    Parameters
    ----------
    backbone : Backbone, name or None (classic)
    k : neighbours averaged per patch (1 = nearest only, as in AnomalyDINO).
    metric : ``"euclidean"``, ``"cosine"`` (patch tokens L2-normalised first; the score is
        then ``1 - cosine similarity``), or ``"auto"``: cosine for transformer backbones, as
        AnomalyDINO uses on DINOv2, Euclidean for the classic descriptors, whose magnitudes
        (contrast, colour) carry meaning.
    positional_radius : None for a free search over every reference patch; an integer r to
        compare a patch only with reference patches within r cells of its own position (for
        aligned domains: fixed-pose objects, bi-temporal pairs). With a single reference the
        leave-one-out scale is always computed with the free search.
    held_out : how the leave-one-out scores are computed (the same numbers to float32 rounding):
        ``"pairs"`` (default) merges nearest-neighbour distances between each pair of
        reference images, one distance block per unordered pair, kept per image pair in the
        ``store`` the pool passes to :meth:`fit_features` so that a new reference set sharing
        images with earlier ones computes only its new pairs; ``"direct"`` searches each
        reference against a bank of all the others (R searches over R - 1 images each), the
        original method, kept as the reference the exactness test compares with.
    top_fraction, smoothing : see :class:`Expert`.

    Learned: ``bank_`` float32 ``[R * gh * gw, D]`` (the reference patches),
    ``reference_grids_`` ``[R, gh, gw, D]``, ``reference_scores_``, ``threshold_``.
    """

    name: ClassVar[str] = "anomaly_vfm"

    def __init__(self, backbone: Backbone | str | None = None, *, k: int = 1, metric: str = "auto",
                 positional_radius: int | None = None, held_out: str = "pairs", top_fraction: float = 0.01,
                 smoothing: float = 0.5):
        super().__init__(backbone, top_fraction=top_fraction, smoothing=smoothing)
        self.k = k
        self.metric = metric
        self.positional_radius = positional_radius
        self.held_out = held_out

    def _validate_params(self) -> None:
        super()._validate_params()
        if int(self.k) < 1:
            raise ValueError(f"{self.name}: k must be >= 1, got {self.k}")
        if self.metric not in ("auto", "euclidean", "cosine"):
            raise ValueError(f"{self.name}: metric must be 'auto', 'euclidean' or 'cosine', got {self.metric!r}")
        if self.positional_radius is not None and int(self.positional_radius) < 0:
            raise ValueError(f"{self.name}: positional_radius must be None or >= 0, got {self.positional_radius}")
        if self.held_out not in ("pairs", "direct"):
            raise ValueError(f"{self.name}: held_out must be 'pairs' or 'direct', got {self.held_out!r}")

    def _prepare(self, features: np.ndarray) -> np.ndarray:
        return _normalise_rows(features) if self.metric_ == "cosine" else features

    def _to_score(self, distances: np.ndarray) -> np.ndarray:
        # For unit vectors ||a - b||^2 = 2 (1 - cos): report the cosine distance itself.
        return distances * distances / 2.0 if self.metric_ == "cosine" else distances

    def _fit_model(self, reference_features: np.ndarray, reference_ids: Sequence[Hashable] | None = None,
                   store: Any = None) -> None:
        self.metric_ = self.metric if self.metric != "auto" else (
            "euclidean" if getattr(self.backbone_, "name", "") == "classic" else "cosine")
        self.reference_grids_ = self._prepare(reference_features)
        self.bank_ = self.reference_grids_.reshape(-1, self.reference_grids_.shape[-1])
        self.search_bank_: Bank | None = None

    def _search_bank(self) -> Bank:
        """The fitted bank as a :class:`Bank`, built at the first query (two threads may both
        build it; either result is the same)."""
        prepared = self.search_bank_
        if prepared is None:
            prepared = self.search_bank_ = Bank(self.bank_, self.backbone_.device, BANK_TILE, int(self.k))
        return prepared

    def _patch_scores(self, query_features: np.ndarray) -> np.ndarray:
        query = self._prepare(query_features)
        if self.positional_radius is not None:
            distances = positional_distances(query, self.reference_grids_, int(self.positional_radius), int(self.k))
        else:
            distances = nearest_distances(query.reshape(-1, query.shape[-1]), self._search_bank(), int(self.k)
                                          ).reshape(self.grid_)
        return self._to_score(distances)

    def _held_out_patch_scores(self, reference_features: np.ndarray, groups: np.ndarray,
                               reference_ids: Sequence[Hashable] | None = None, store: Any = None) -> np.ndarray:
        grids = self.reference_grids_
        if self.held_out == "pairs" and grids.shape[0] >= 2:
            return self._to_score(self._held_out_from_pairs(reference_ids, store))
        out = np.empty(grids.shape[:3], np.float32)
        if self.positional_radius is not None and grids.shape[0] >= 2:
            for r in range(grids.shape[0]):
                others = np.delete(grids, r, axis=0)
                out[r] = positional_distances(grids[r], others, int(self.positional_radius), int(self.k))
            return self._to_score(out)
        flat_groups = groups.ravel()
        flat_out = out.reshape(-1)
        for g in np.unique(flat_groups):
            inside = flat_groups == g
            flat_out[inside] = nearest_distances(self.bank_[inside], self.bank_[~inside], int(self.k),
                                                 self.backbone_.device)
        return self._to_score(out)

    def _held_out_from_pairs(self, reference_ids: Sequence[Hashable] | None, store: Any) -> np.ndarray:
        """``[R, gh, gw]`` leave-one-out distances merged from per-pair nearest neighbours.

        With ``store`` (an :class:`~anomalyclaw.cache.LRUCache`) and one id per reference, each
        image pair's neighbours are kept under ``(what, id_a, id_b)``, ``what`` naming this
        expert's search (metric, radius, k), so that another set holding both images reuses them.
        """
        grids = self.reference_grids_
        n, gh, gw, d = grids.shape
        k, radius = int(self.k), self.positional_radius
        flat = grids.reshape(n, gh * gw, d)
        ids = list(reference_ids) if reference_ids is not None and len(reference_ids) == n else None
        what = (self.name, self.metric_, None if radius is None else int(radius), k)
        local: dict[tuple[int, int], np.ndarray] = {}

        def free_pair(i: int, j: int) -> np.ndarray:
            def compute() -> np.ndarray:
                ij, ji = pair_nearest(flat[i], flat[j], k, self.backbone_.device)
                if store is not None and ids is not None:
                    store.put((what, ids[j], ids[i]), ji)
                local[(j, i)] = ji
                return ij
            if (i, j) in local:
                return local[(i, j)]
            if store is not None and ids is not None:
                return store.get_or_compute((what, ids[i], ids[j]), compute)
            local[(i, j)] = value = compute()
            return value

        def positional_pair(i: int, j: int) -> np.ndarray:
            def compute() -> np.ndarray:
                near = positional_nearest(grids[i], grids[j:j + 1], int(radius), k)
                return np.ascontiguousarray(near.reshape(near.shape[0], -1).T)
            if store is not None and ids is not None:
                return store.get_or_compute((what, ids[i], ids[j]), compute)
            return compute()

        pair: Callable[[int, int], np.ndarray] = free_pair if radius is None else positional_pair
        out = np.empty((n, gh * gw), np.float32)
        for r in range(n):
            out[r] = _merge_nearest([pair(r, j) for j in range(n) if j != r], k)
        return out.reshape(n, gh, gw)
