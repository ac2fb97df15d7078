"""PCA subspace expert (SubspaceAD-style): a query patch is as anomalous as the part of it that
the principal subspace of normal patches cannot reconstruct."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from sklearn.decomposition import PCA

from .backbones import Backbone
from .base import Expert


def _residual_energy(pca: PCA, patches: np.ndarray) -> np.ndarray:
    """float32 ``[M]``: squared norm of each row's residual off the PCA subspace."""
    centred = patches - pca.mean_
    coefficients = centred @ pca.components_.T
    residual = centred - coefficients @ pca.components_
    return np.einsum("md,md->m", residual, residual).astype(np.float32)


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
    top_fraction, smoothing : see :class:`Expert`.

    Learned: ``pca_`` (a fitted :class:`sklearn.decomposition.PCA`), ``n_components_``,
    ``reference_scores_``, ``threshold_``.
    """

    name: ClassVar[str] = "subspace_ad"

    def __init__(self, backbone: Backbone | str | None = None, *, variance: float = 0.99,
                 n_components: int | None = None, top_fraction: float = 0.01, smoothing: float = 0.5):
        super().__init__(backbone, top_fraction=top_fraction, smoothing=smoothing)
        self.variance = variance
        self.n_components = n_components

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.n_components is None and not 0.0 < float(self.variance) < 1.0:
            raise ValueError(f"{self.name}: variance must be in (0, 1), got {self.variance}")
        if self.n_components is not None and int(self.n_components) < 1:
            raise ValueError(f"{self.name}: n_components must be >= 1 or None, got {self.n_components}")

    def _make_pca(self, patches: np.ndarray) -> PCA:
        if self.n_components is None:
            components: float | int = float(self.variance)
        else:
            limit = min(patches.shape) - 1
            if int(self.n_components) > limit:
                raise ValueError(f"{self.name}: n_components={self.n_components} leaves no residual for "
                                 f"{patches.shape[0]} patches of dimension {patches.shape[1]}; use at "
                                 f"most {limit}, or set variance instead")
            components = int(self.n_components)
        # svd_solver="auto" takes the covariance eigen-solver when patches far outnumber
        # dimensions (the usual case here): milliseconds instead of a full SVD.
        return PCA(n_components=components, svd_solver="auto", random_state=0).fit(patches)

    def _fit_model(self, reference_features: np.ndarray) -> None:
        patches = reference_features.reshape(-1, reference_features.shape[-1])
        self.pca_ = self._make_pca(patches)
        self.n_components_ = int(self.pca_.n_components_)

    def _patch_scores(self, query_features: np.ndarray) -> np.ndarray:
        flat = query_features.reshape(-1, query_features.shape[-1])
        return _residual_energy(self.pca_, flat).reshape(self.grid_)

    def _held_out_patch_scores(self, reference_features: np.ndarray, groups: np.ndarray) -> np.ndarray:
        patches = reference_features.reshape(-1, reference_features.shape[-1])
        flat_groups = groups.ravel()
        out = np.empty(flat_groups.shape, np.float32)
        for g in np.unique(flat_groups):
            inside = flat_groups == g
            out[inside] = _residual_energy(self._make_pca(patches[~inside]), patches[inside])
        return out.reshape(groups.shape)
