"""The medical domains: S3 CT phantom slices, S4 retinal fundus photographs, S5 histology
(immunohistochemistry) fields of view."""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from skimage import color, data

from .base import Sample
from .raster import (
    _acquisition,
    _blob_alpha,
    _crack_alpha,
    _crop_resize,
    _dilate,
    _finish,
    _geometry_map,
    _inside,
    _lerp,
    _local_warp,
    _pick,
    _remap,
    _seed_defect,
    _smooth_field,
)


@lru_cache(maxsize=None)
def _phantom(size: int) -> np.ndarray:
    ph = data.shepp_logan_phantom().astype(np.float32)
    return cv2.resize(ph, (size, size), interpolation=cv2.INTER_AREA)


def _ct_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    elastic_amp = rng.uniform(1.0, 2.5) * s
    elastic = (_smooth_field(rng, size, 60 * s) * elastic_amp, _smooth_field(rng, size, 60 * s) * elastic_amp)
    mx, my = _geometry_map(size, size, angle=rng.uniform(-4, 4),
                           scale=(rng.uniform(0.93, 1.03), rng.uniform(0.93, 1.03)),
                           shift=tuple(rng.uniform(-4, 4, 2) * s), elastic=elastic)
    density = _remap(_phantom(size), mx, my, border=cv2.BORDER_CONSTANT)
    # Tissue density differs a little between patients and across the slice.
    density = density * (1.0 + 0.04 * _smooth_field(rng, size, size / 3))
    lo, hi = rng.uniform(-0.02, 0.03), rng.uniform(0.45, 0.6)
    acq = _acquisition(rng, gain=(0.94, 1.06), offset=(-0.01, 0.01), gamma=(0.9, 1.1), blur=(0.3, 0.9),
                       noise=(0.02, 0.035), noise_grain=0.8, grey=True)

    def window(d: np.ndarray) -> np.ndarray:
        return np.repeat(np.clip((d - lo) / (hi - lo), 0, 1)[..., None], 3, axis=2)

    clean = window(density)
    if not anomalous:
        return _finish(acq, clean)
    skull_free = (density > 0.02) & (density < 0.6)
    interior = _inside(skull_free, 4 * s)

    def draw(kind: str, t: float):
        if kind == "lesion":
            hypo = rng.random() < 0.6
            delta = (-1 if hypo else 1) * _lerp(0.06, 0.16, t)
            lesion = np.zeros((size, size), np.float32)
            for _ in range(1 if rng.random() < 0.7 else int(rng.integers(2, 4))):
                r = _lerp(5, 13, t) * s * rng.uniform(0.7, 1.3)
                allowed = _inside(skull_free, r + 3 * s) & ((density > 0.12) if hypo else True)
                centre = _pick(rng, allowed)
                if centre is None:
                    continue
                lesion = np.maximum(lesion, _blob_alpha(rng, size, centre, r, irregularity=0.15, softness=0.15,
                                                        aspect=rng.uniform(1, 1.6), angle=rng.uniform(0, np.pi)))
            return window(density + delta * lesion), lesion > 0.5
        # mass_effect: a mass pushes the structures around it outwards
        edges = cv2.GaussianBlur(np.abs(cv2.Sobel(density, cv2.CV_32F, 1, 0)) +
                                 np.abs(cv2.Sobel(density, cv2.CV_32F, 0, 1)), (0, 0), 2)
        radius = _lerp(14, 28, t) * s
        centre = _pick(rng, _inside(skull_free, radius * 0.6) & (edges > 0.05))
        if centre is None:
            centre = _pick(rng, interior)
        wx, wy, disp = _local_warp(size, centre, radius, _lerp(3, 8, t) * s, "bulge")
        moved = _remap(density, wx, wy, border=cv2.BORDER_CONSTANT)
        return window(moved), (disp > 0.5) & ((density > 0.02) | (moved > 0.02))

    return _finish(acq, clean, _seed_defect(rng, clean, ("lesion", "mass_effect"), (2, 1), draw))



@lru_cache(maxsize=None)
def _retina(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fundus photograph float32 (size, size, 3) and its field-of-view mask (float)."""
    photo = cv2.resize(data.retina(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return photo, (photo.max(axis=2) > 0.08).astype(np.float32)


def _retina_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    photo, fov = _retina(size)
    iso = rng.uniform(0.95, 1.05)
    elastic_amp = rng.uniform(1.0, 2.5) * s
    elastic = (_smooth_field(rng, size, 50 * s) * elastic_amp, _smooth_field(rng, size, 50 * s) * elastic_amp)
    mx, my = _geometry_map(size, size, angle=rng.uniform(-12, 12),
                           scale=(iso * rng.uniform(0.98, 1.02), iso * rng.uniform(0.98, 1.02)),
                           shift=tuple(rng.uniform(-0.03, 0.03, 2) * size), flip=bool(rng.random() < 0.5),
                           elastic=elastic)
    clean = _remap(photo, mx, my, border=cv2.BORDER_CONSTANT)
    field = _remap(fov, mx, my, border=cv2.BORDER_CONSTANT) > 0.5
    # Pigmentation and camera colour differ between patients and fundus cameras.
    acq = _acquisition(rng, gain=(0.9, 1.1), tint=0.06, offset=(-0.01, 0.01), gamma=(0.85, 1.18),
                       vignette=(0.0, 0.25), blur=(0.0, 0.8), noise=(0.006, 0.015))
    if not anomalous:
        return _finish(acq, clean)
    retina_area = _inside(field, 0.07 * size)

    def spots(centres_radii, irregularity, softness, aspect=(1.0, 1.0)) -> np.ndarray:
        alpha = np.zeros((size, size), np.float32)
        for centre, r in centres_radii:
            alpha = np.maximum(alpha, _blob_alpha(rng, size, centre, r, irregularity=irregularity, softness=softness,
                                                  aspect=rng.uniform(*aspect), angle=rng.uniform(0, np.pi)))
        return alpha

    def draw(kind: str, t: float):
        if kind == "haemorrhage":
            n = int(rng.integers(1, 4))
            blobs = [(_pick(rng, retina_area), _lerp(3.0, 8.0, t) * s * rng.uniform(0.7, 1.3)) for _ in range(n)]
            alpha = spots(blobs, 0.35, 0.25, aspect=(1.0, 2.5))
            strength = _lerp(0.55, 0.95, t)
            target = clean * np.array([0.5, 0.22, 0.25], np.float32)  # deeper, darker red
        elif kind == "exudate":
            centre = np.asarray(_pick(rng, retina_area))
            spread = _lerp(6, 16, t) * s
            n = int(rng.integers(3, 12))
            blobs = [(centre + rng.normal(0, spread, 2), max(1.0, _lerp(0.9, 2.6, t) * s * rng.uniform(0.7, 1.3)))
                     for _ in range(n)]
            alpha = spots(blobs, 0.2, 0.15)
            strength = _lerp(0.45, 0.9, t)
            target = np.broadcast_to(np.array([1.0, 0.9, 0.5], np.float32), clean.shape)
        else:  # cotton_wool_spot: pale fluffy patches
            n = int(rng.integers(1, 3))
            blobs = [(_pick(rng, retina_area), _lerp(6, 13, t) * s * rng.uniform(0.8, 1.2)) for _ in range(n)]
            alpha = spots(blobs, 0.4, 0.4)
            strength = _lerp(0.45, 0.8, t)
            target = np.broadcast_to(np.array([0.95, 0.86, 0.78], np.float32), clean.shape)
        alpha = alpha * field
        a = (alpha * strength)[..., None]
        return clean * (1 - a) + target * a, _dilate(alpha > 0.35, 1) & field

    return _finish(acq, clean, _seed_defect(rng, clean, ("haemorrhage", "exudate", "cotton_wool_spot"),
                                            (1, 1, 1), draw))



@lru_cache(maxsize=1)
def _ihc_stains() -> np.ndarray:
    """``skimage.data.immunohistochemistry()`` unmixed into H, E, DAB stain densities (float32)."""
    return color.rgb2hed(data.immunohistochemistry()).astype(np.float32)


def _histology_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    stains = _crop_resize(rng, _ihc_stains(), size, (0.6, 0.74))
    # Stain batches and section thickness vary: scale each stain's density (HED augmentation).
    stains = stains * np.array([rng.uniform(0.85, 1.15), 1.0, rng.uniform(0.8, 1.2)], np.float32)

    def to_rgb(hed: np.ndarray) -> np.ndarray:
        return color.hed2rgb(np.maximum(hed, 0)).astype(np.float32)

    clean = to_rgb(stains)
    acq = _acquisition(rng, gain=(0.95, 1.05), tint=0.02, offset=(-0.01, 0.01), gamma=(0.92, 1.08),
                       blur=(0.0, 0.8), noise=(0.005, 0.012))
    if not anomalous:
        return _finish(acq, clean)
    tissue = cv2.GaussianBlur((stains[..., 0] + stains[..., 2] > 0.03).astype(np.float32), (0, 0), 3) > 0.5

    def draw(kind: str, t: float):
        changed = stains.copy()
        if kind == "atypical_nuclei":
            centre = np.asarray(_pick(rng, _inside(tissue, 12 * s)) or rng.uniform(0.2, 0.8, 2) * size)
            alpha = np.zeros((size, size), np.float32)
            for _ in range(int(rng.integers(1, 5))):
                r = _lerp(5, 10, t) * s * rng.uniform(0.8, 1.2)
                alpha = np.maximum(alpha, _blob_alpha(rng, size, centre + rng.normal(0, 10 * s, 2), r,
                                                      irregularity=0.3, softness=0.12,
                                                      aspect=rng.uniform(1, 1.5), angle=rng.uniform(0, np.pi)))
            # Hyperchromatic: dense, clumped chromatin.
            chromatin = 1.0 + 0.3 * _smooth_field(rng, size, 2 * s)
            changed[..., 0] = changed[..., 0] * (1 - alpha) + alpha * _lerp(0.07, 0.12, t) * chromatin
            changed[..., 2] *= 1 - 0.8 * alpha
            mask = alpha > 0.4
        elif kind == "abnormal_stain":
            centre = _pick(rng, _inside(tissue, 8 * s)) or tuple(rng.uniform(0.2, 0.8, 2) * size)
            radius = _lerp(0.07, 0.16, t) * size
            blob = _blob_alpha(rng, size, centre, radius, irregularity=0.4, softness=0.25)
            if rng.random() < 0.5:  # overstaining: strong, dark DAB
                changed[..., 2] += blob * _lerp(0.15, 0.4, t)
            else:  # loss of staining
                changed[..., 2] *= 1 - blob * _lerp(0.6, 0.95, t)
                changed[..., 0] *= 1 - blob * _lerp(0.3, 0.6, t)
            mask = blob > 0.5
        else:  # tissue_tear: a thin gap where tissue came apart on the slide
            start = rng.uniform(0.2, 0.8, 2) * size
            alpha = _crack_alpha(rng, size, start, _lerp(0.2, 0.55, t) * size, _lerp(1.5, 5, t) * s, wander=0.2)
            changed *= (1 - alpha)[..., None]
            mask = _dilate(alpha > 0.3, 1)
        return to_rgb(changed), mask

    return _finish(acq, clean, _seed_defect(rng, clean, ("atypical_nuclei", "abnormal_stain", "tissue_tear"),
                                            (1, 1, 1), draw))
