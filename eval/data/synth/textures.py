"""S1, a texture surface: gravel aggregate (asphalt / concrete-like)."""
from __future__ import annotations

import cv2
import numpy as np

from .base import Sample
from .raster import (
    _INDUSTRIAL_CAMERA,
    _acquisition,
    _blob_alpha,
    _crack_alpha,
    _crop_resize,
    _dilate,
    _finish,
    _grey3,
    _grey_source,
    _grid,
    _lerp,
    _local_warp,
    _remap,
    _seed_defect,
    _smooth_field,
)


def _texture_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    grey = _crop_resize(rng, _grey_source("gravel"), size, (0.5, 0.7))
    grey = grey * (1.0 + rng.uniform(0.03, 0.08) * _smooth_field(rng, size, size / 2.5))
    tint = np.array([1.0, 0.96, 0.9], np.float32) + rng.uniform(-0.01, 0.01, 3).astype(np.float32)
    clean = _grey3(grey, tint)
    acq = _acquisition(rng, **_INDUSTRIAL_CAMERA)
    if not anomalous:
        return _finish(acq, clean)

    def draw(kind: str, t: float):
        if kind == "crack":
            start = rng.uniform(0.15, 0.85, 2) * size
            alpha = _crack_alpha(rng, size, start, _lerp(0.2, 0.6, t) * size, _lerp(1.5, 3.5, t) * s)
            depth = _lerp(0.4, 0.85, t)
            return clean * (1 - depth * alpha)[..., None], _dilate(alpha > 0.25, 1)
        centre = rng.uniform(0.15, 0.85, 2) * size
        if kind == "stain":
            radius = _lerp(0.05, 0.14, t) * size * rng.uniform(0.8, 1.2)
            blob = _blob_alpha(rng, size, centre, radius, irregularity=0.4, softness=0.3)
            colours = ([0.12, 0.1, 0.09], [0.6, 0.32, 0.14], [1.0, 1.0, 0.97])
            colour = np.asarray(colours[int(rng.integers(3))], np.float32)
            # The surface grain shows through a stain, as it does through a spill.
            stained = colour * (0.55 + 0.9 * grey[..., None])
            strength = _lerp(0.35, 0.75, t)
            a = (blob * strength)[..., None]
            return clean * (1 - a) + stained * a, blob > 0.5
        if kind == "texture_change":
            radius = _lerp(0.07, 0.16, t) * size * rng.uniform(0.8, 1.2)
            blob = _blob_alpha(rng, size, centre, radius, irregularity=0.35, softness=0.15)
            variant = int(rng.integers(3))
            if variant == 0:  # coarser aggregate: the same stone at twice the scale
                foreign = _crop_resize(rng, _grey_source("gravel"), size, (0.22, 0.3))
            elif variant == 1:  # worn smooth
                foreign = cv2.GaussianBlur(grey, (0, 0), _lerp(1.5, 3.5, t) * s)
            else:  # foreign material (vegetation) with the local brightness
                foreign = _crop_resize(rng, _grey_source("grass"), size, (0.4, 0.6))
            region = blob > 0.5
            foreign = (foreign - foreign[region].mean()) / (foreign[region].std() + 1e-6)
            foreign = grey[region].mean() + foreign * grey[region].std()
            a = blob[..., None]
            return clean * (1 - a) + _grey3(foreign, tint) * a, region
        # deformation: a local bulge or dip; lit from the top left, one flank brightens, one darkens
        radius = _lerp(0.07, 0.13, t) * size
        bump = 1.0 if rng.random() < 0.5 else -1.0
        mx, my, disp = _local_warp(size, centre, radius, _lerp(2.0, 5.0, t) * s, "bulge" if bump > 0 else "pinch")
        xx, yy = _grid(size)
        dx, dy = xx - centre[0], yy - centre[1]
        shade = bump * _lerp(0.35, 0.8, t) * -(dx + dy) / (np.sqrt(2) * radius) * np.exp(
            -(dx * dx + dy * dy) / radius ** 2) * (disp > 0)
        shade = shade.astype(np.float32)
        return _remap(clean, mx, my) * (1 + shade)[..., None], (np.abs(shade) > 0.03) | (disp > 1.0)

    return _finish(acq, clean, _seed_defect(rng, clean, ("crack", "stain", "texture_change", "deformation"),
                                            (1, 1, 1, 1), draw))
