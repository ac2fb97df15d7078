"""Frozen feature backbones and training-free anomaly experts with a fit/score API.

``load_backbone`` gives a feature extractor (``classic``, ``dinov2``, ``clip``);
``PatchKNNExpert`` ("anomaly_vfm") and ``SubspaceExpert`` ("subspace_ad") fit on normal
references and score a query into an :class:`ExpertResult`; ``ExpertPool`` caches fitted
experts per reference set; ``maps`` turns anomaly maps into overlays and boxes; ``caches``
reads the released per-item expert outputs and retrieval indexes.
"""
from __future__ import annotations

from .backbones import Backbone, ClassicBackbone, TransformersBackbone, load_backbone
from .base import Expert, ExpertResult
from .caches import ReleasedScoreCache, RetrievalIndex
from .maps import normalize_map, overlay_heatmap, suggest_bbox, top_regions
from .patchknn import PatchKNNExpert
from .pool import EXPERTS, ExpertPool, default_params
from .subspace import SubspaceExpert

__all__ = [
    "Backbone", "ClassicBackbone", "TransformersBackbone", "load_backbone",
    "Expert", "ExpertResult", "PatchKNNExpert", "SubspaceExpert", "EXPERTS", "ExpertPool", "default_params",
    "ReleasedScoreCache", "RetrievalIndex",
    "normalize_map", "overlay_heatmap", "suggest_bbox", "top_regions",
]
