"""The synthetic benchmark's shared types: a rendered :class:`Sample`, a :class:`SynthDomain`, and the
constants every domain uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from anomalyclaw.domains import DomainCard

SOURCE_DATASET = "synthetic (scikit-image)"
#: Normal images per domain that only ever serve as references (never queries).
REFERENCE_POOL_SIZE = 10
#: References drawn per item from the pool (a bi-temporal item has exactly one: its "before").
N_REFERENCES = 4

#: Each seeded anomaly type and the defect family it belongs to.
DEFECT_FAMILIES: dict[str, str] = {
    "crack": "crack_or_scratch", "scratch": "crack_or_scratch", "tissue_tear": "crack_or_scratch",
    "stain": "stain_or_colour", "abnormal_stain": "stain_or_colour",
    "haemorrhage": "stain_or_colour", "exudate": "stain_or_colour",
    "cotton_wool_spot": "stain_or_colour",
    "missing_part": "missing_or_extra_part", "extra_part": "missing_or_extra_part",
    "new_building": "missing_or_extra_part", "demolished_building": "missing_or_extra_part",
    "misplaced_part": "logical_layout",
    "size_change": "deformation_or_texture", "deformation": "deformation_or_texture",
    "texture_change": "deformation_or_texture", "mass_effect": "deformation_or_texture",
    "lesion": "deformation_or_texture", "atypical_nuclei": "deformation_or_texture",
}


@dataclass
class Sample:
    """One rendered image of a synthetic domain.

    ``image`` and ``clean`` are (H, W, 3) uint8 RGB; ``clean`` is the same scene and acquisition
    without the defect (equal to ``image`` for a normal sample). ``mask`` is an (H, W) bool array
    of the pixels the defect changed, ``anomaly_type`` a key of :data:`DEFECT_FAMILIES` and
    ``severity`` in [0, 1] (0 = subtle: small and low contrast). ``reference`` is the "before"
    image of a bi-temporal pair, else ``None``.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None = None
    anomaly_type: str | None = None
    severity: float | None = None
    reference: np.ndarray | None = None


SampleFn = Callable[[np.random.Generator, int, bool], Sample]


@dataclass(frozen=True)
class SynthDomain:
    """One synthetic domain: its card, the scikit-image sources it draws on, the anomaly types
    it seeds and ``sample(rng, size, anomalous) -> Sample`` that renders one image."""

    code: str
    name: str
    category: str
    sources: tuple[str, ...]
    anomaly_types: tuple[str, ...]
    card: DomainCard
    sample: SampleFn

    @property
    def bi_temporal(self) -> bool:
        return self.card.reference_type == "bi_temporal"
