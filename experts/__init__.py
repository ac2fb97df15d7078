"""Frozen feature backbones and training-free anomaly experts with a fit/score API.

``load_backbone`` gives a feature extractor (``classic``, ``dinov2``, ``clip``);
``PatchKNNExpert`` ("anomaly_vfm") and ``SubspaceExpert`` ("subspace_ad") fit on normal
references and score a query into an :class:`ExpertResult`; ``ExpertPool`` caches fitted
experts per reference set; ``maps`` turns anomaly maps into overlays and boxes; ``released``
reads the released per-item expert outputs and retrieval indexes.
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "backbones": ["Backbone", "ClassicBackbone", "TransformersBackbone", "load_backbone"],
    "base": ["Expert", "ExpertResult"],
    "patchknn": ["PatchKNNExpert"],
    "subspace": ["SubspaceExpert"],
    "pool": ["DEFAULT_EXPERT", "EXPERTS", "ExpertPool", "FUSION_EXPERTS", "default_params", "default_pool"],
    "released": ["ReleasedScoreCache", "RetrievalIndex"],
    "maps": ["normalize_map", "overlay_heatmap", "suggest_bbox", "top_regions"],
})
