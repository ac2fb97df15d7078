"""PCA subspace expert (SubspaceAD-style): a query patch is as anomalous as the part of it that
the principal subspace of normal patches cannot reconstruct."""
from __future__ import annotations

from typing import Any, ClassVar, Hashable, Sequence

import numpy as np
from sklearn.decomposition import PCA

from .backbones import Backbone
from .base import Expert


def _residual_energy(pca: Any, patches: np.ndarray) -> np.ndarray:
    """float32 ``[M]``: squared norm of each row's residual off the PCA subspace (``pca`` has
    ``mean_`` and ``components_``: a fitted PCA or a :class:`_Subspace`)."""
    centred = patches - pca.mean_
    coefficients = centred @ pca.components_.T
    residual = centred - coefficients @ pca.components_
    return np.einsum("md,md->m", residual, residual).astype(np.float32)


class _Subspace:
    """The mean and leading principal axes of a set of patches, from summed moments (the
    attributes a fitted PCA has that scoring reads)."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained_variance: np.ndarray):
        self.mean_ = mean
        self.components_ = components
        self.explained_variance_ = explained_variance
        self.n_components_ = int(components.shape[0])

    def __repr__(self) -> str:
        return f"_Subspace(n_components={self.n_components_}, n_features={self.components_.shape[1]})"


def patch_moments(patches: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, sum ``[D]``, sum of outer products ``[D, D]``) of ``patches`` ``[M, D]``, in
    float64: moments add up over images, so a set's and each leave-one-out subset's covariance
    come from per-image moments without touching the patches again."""
    x = np.asarray(patches, np.float64)
    return x.shape[0], x.sum(axis=0), x.T @ x


class SubspaceExpert(Expert):
    """Squared reconstruction error off a PCA subspace of the reference patches (SubspaceAD).

    Parameters
    ----------
    backbone : Backbone, name or None (classic)
    variance : keep the leading components that explain this fraction of the reference
        patches' variance (used when ``n_components`` is None). 0.99 as in SubspaceAD; on
        the classic descriptors the choice barely matters (synthetic benchmark, image AUROC
        0.57 / 0.52 for 0.99 / 0.95 with seed 1, 0.49 / 0.57 with seed 0).
    n_components : a fixed number of components instead (at most min(patches, D) - 1, so a
        residual remains).
    held_out : ``"moments"`` (default): each leave-one-out subspace comes from the eigenvectors
        of the covariance summed from per-image moments (float64; kept per image in the pool's
        ``store``, so a new set sharing images with earlier ones sums what it has), with the same
        component rule as scikit-learn's PCA; ``"direct"``: a scikit-learn PCA refitted on the
        patches of the other references for each one, the original method (the exactness test's
        reference; the two agree to float32 rounding of the covariance).
    top_fraction, smoothing : see :class:`Expert`.

    Learned: ``pca_`` (the subspace: ``mean_``, ``components_``, ``explained_variance_``,
    ``n_components_``; a fitted :class:`sklearn.decomposition.PCA` with ``held_out="direct"``),
    ``n_components_``, ``reference_scores_``, ``threshold_``.
    """

    name: ClassVar[str] = "subspace_ad"

    def __init__(self, backbone: Backbone | str | None = None, *, variance: float = 0.99,
                 n_components: int | None = None, held_out: str = "moments", top_fraction: float = 0.01,
                 smoothing: float = 0.5):
        super().__init__(backbone, top_fraction=top_fraction, smoothing=smoothing)
        self.variance = variance
        self.n_components = n_components
        self.held_out = held_out

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.n_components is None and not 0.0 < float(self.variance) < 1.0:
            raise ValueError(f"{self.name}: variance must be in (0, 1), got {self.variance}")
        if self.n_components is not None and int(self.n_components) < 1:
            raise ValueError(f"{self.name}: n_components must be >= 1 or None, got {self.n_components}")
        if self.held_out not in ("moments", "direct"):
            raise ValueError(f"{self.name}: held_out must be 'moments' or 'direct', got {self.held_out!r}")

    def _fixed_components(self, count: int, dim: int) -> int:
        """``n_components`` as an int, checked to leave a residual for ``count`` patches of
        dimension ``dim``."""
        limit = min(int(count), int(dim)) - 1
        if int(self.n_components) > limit:
            raise ValueError(f"{self.name}: n_components={self.n_components} leaves no residual for "
                             f"{count} patches of dimension {dim}; use at most {limit}, or set variance instead")
        return int(self.n_components)

    def _make_pca(self, patches: np.ndarray) -> PCA:
        if self.n_components is None:
            components: float | int = float(self.variance)
        else:
            components = self._fixed_components(patches.shape[0], patches.shape[1])
        # svd_solver="auto" takes the covariance eigen-solver when patches far outnumber
        # dimensions (the usual case here): milliseconds instead of a full SVD.
        return PCA(n_components=components, svd_solver="auto", random_state=0).fit(patches)

    def _moments(self, reference_features: np.ndarray, reference_ids: Sequence[Hashable] | None,
                 store: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Each reference image's :func:`patch_moments` (from ``store`` when it has them)."""
        n = reference_features.shape[0]
        per_image = reference_features.reshape(n, -1, reference_features.shape[-1])
        ids = list(reference_ids) if reference_ids is not None and len(reference_ids) == n else None
        if store is None or ids is None:
            return [patch_moments(per_image[r]) for r in range(n)]
        return [store.get_or_compute(("subspace_moments", ids[r]), lambda r=r: patch_moments(per_image[r]))
                for r in range(n)]

    def _fit_model(self, reference_features: np.ndarray, reference_ids: Sequence[Hashable] | None = None,
                   store: Any = None) -> None:
        if self.held_out == "moments":
            moments = self._moments(reference_features, reference_ids, store)
            self._fit_moments = moments  # read by _held_out_patch_scores, then dropped
            self.pca_ = self._subspace(sum(m[0] for m in moments), sum(m[1] for m in moments),
                                       sum(m[2] for m in moments))
        else:
            patches = reference_features.reshape(-1, reference_features.shape[-1])
            self.pca_ = self._make_pca(patches)
        self.n_components_ = int(self.pca_.n_components_)

    def _patch_scores(self, query_features: np.ndarray) -> np.ndarray:
        flat = query_features.reshape(-1, query_features.shape[-1])
        return _residual_energy(self.pca_, flat).reshape(self.grid_)

    def _held_out_patch_scores(self, reference_features: np.ndarray, groups: np.ndarray,
                               reference_ids: Sequence[Hashable] | None = None, store: Any = None) -> np.ndarray:
        patches = reference_features.reshape(-1, reference_features.shape[-1])
        flat_groups = groups.ravel()
        out = np.empty(flat_groups.shape, np.float32)
        n = reference_features.shape[0]
        moments = self.__dict__.pop("_fit_moments", None)
        if self.held_out == "moments" and n >= 2:
            per_image = reference_features.reshape(n, -1, reference_features.shape[-1])
            if moments is None:
                moments = self._moments(reference_features, reference_ids, store)
            total_n = sum(m[0] for m in moments)
            total_s = sum(m[1] for m in moments)
            total_q = sum(m[2] for m in moments)
            for r in range(n):
                count, s_r, q_r = moments[r]
                subspace = self._subspace(total_n - count, total_s - s_r, total_q - q_r)
                out[flat_groups == r] = _residual_energy(subspace, per_image[r])
            return out.reshape(groups.shape)
        for g in np.unique(flat_groups):
            inside = flat_groups == g
            out[inside] = _residual_energy(self._make_pca(patches[~inside]), patches[inside])
        return out.reshape(groups.shape)

    def _subspace(self, count: int, total: np.ndarray, outer: np.ndarray) -> _Subspace:
        """The principal subspace of ``count`` patches with these moments, with the components
        scikit-learn's PCA keeps (``n_components``, or the fewest that explain ``variance``)."""
        mean = total / count
        covariance = (outer - count * np.outer(mean, mean)) / max(1, count - 1)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1]
        values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
        if self.n_components is None:
            ratio = np.cumsum(values) / max(values.sum(), 1e-300)
            keep = int(np.searchsorted(ratio, float(self.variance), side="right")) + 1
        else:
            keep = self._fixed_components(count, outer.shape[0])
        keep = min(keep, values.size)
        return _Subspace(mean.astype(np.float32), np.ascontiguousarray(vectors[:, :keep].T, dtype=np.float32),
                         values[:keep].astype(np.float32))
