"""S7, a rotating part: a machined hex nut at any in-plane rotation."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .base import Sample
from .raster import (
    _INDUSTRIAL_CAMERA,
    _acquisition,
    _bezier,
    _blob_alpha,
    _crop_resize,
    _disc_alpha,
    _finish,
    _grey3,
    _grey_source,
    _grid,
    _lerp,
    _local_warp,
    _poly_alpha,
    _polyline_alpha,
    _remap,
    _seed_defect,
    _standardise,
)


@dataclass
class _NutPart:
    """The nut in its own frame (centred on the canvas): grey value, alpha, chamfer weight."""

    value: np.ndarray
    alpha: np.ndarray
    chamfer: np.ndarray


def _nut_part(rng: np.random.Generator, size: int, radius: float) -> _NutPart:
    s = size / 256
    c = (size - 1) / 2.0
    corners = np.array([[c + radius * np.cos(a), c + radius * np.sin(a)]
                        for a in np.deg2rad(np.arange(0, 360, 60))])
    hexagon = _poly_alpha(size, corners)
    face_disc = _disc_alpha(size, (c, c), 0.88 * radius)
    hole = _disc_alpha(size, (c, c), 0.30 * radius)
    thread = _disc_alpha(size, (c, c), 0.40 * radius) - hole
    xx, yy = _grid(size)
    r = np.hypot(xx - c, yy - c)
    # Brushed steel: stone grain smeared along one direction, plus concentric turning marks.
    grain = _crop_resize(rng, _grey_source("gravel"), size, (0.4, 0.6))
    length = max(3, int(15 * s)) | 1
    grain = _standardise(cv2.filter2D(grain, -1, np.full((1, length), 1.0 / length, np.float32)))
    value = 0.6 + 0.025 * grain + 0.015 * np.sin(2 * np.pi * r / (2.5 * s))
    value = value * (1 - thread) + thread * (0.32 + 0.1 * np.sin(2 * np.pi * r / (3 * s)))
    # A stamped size mark breaks the six-fold symmetry, so rotation is visible.
    mark = np.zeros((size, size), np.uint8)
    scale = 0.5 * s
    (tw, th), _ = cv2.getTextSize("M8", cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, round(1.3 * s)))
    org = (int(c - tw / 2), int(c - 0.6 * radius + th / 2))
    cv2.putText(mark, "M8", org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, round(1.3 * s)), cv2.LINE_AA)
    mark_f = mark.astype(np.float32) / 255
    value = value - 0.16 * mark_f + 0.07 * np.roll(mark_f, (-1, -1), (0, 1))
    return _NutPart(value.astype(np.float32), hexagon * (1 - hole), hexagon * (1 - face_disc))


def _nut_lighting(size: int, centre: np.ndarray, light: float) -> tuple[np.ndarray, np.ndarray]:
    """(chamfer shading, face gain), each (size, size): a light from direction ``light``
    (radians, image frame) brightens the chamfer and face on its side of the nut."""
    xx, yy = _grid(size)
    towards = (xx - centre[0]) * np.float32(np.cos(light)) + (yy - centre[1]) * np.float32(np.sin(light))
    facing = towards / np.maximum(cv2.magnitude(xx - centre[0], yy - centre[1]), 1.0)
    return 0.35 * facing - 0.12, 1 + towards * np.float32(0.05 / (0.35 * size))


def _render_nut(part: _NutPart, size: int, theta: float, centre: np.ndarray, light: float,
                lighting: tuple[np.ndarray, np.ndarray], mat: np.ndarray, extra: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate the part by ``theta`` degrees and place it at ``centre`` on the mat, lit by
    ``lighting`` from :func:`_nut_lighting`. ``extra`` (own frame) is rotated along and returned."""
    c = (size - 1) / 2.0
    m = cv2.getRotationMatrix2D((c, c), theta, 1.0)
    m[:, 2] += centre - c
    stack = np.dstack([part.value, part.alpha, part.chamfer] + ([extra] if extra is not None else []))
    warped = cv2.warpAffine(stack, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    value, alpha, chamfer = warped[..., 0], warped[..., 1], warped[..., 2]
    chamfer_shade, face_gain = lighting
    value = value * (1 + chamfer * chamfer_shade) * face_gain
    steel = _grey3(value, (0.97, 0.99, 1.03))
    # The nut's soft shadow falls away from the light.
    shift = (int(round(-3 * np.sin(light) * size / 256)), int(round(-3 * np.cos(light) * size / 256)))
    drop = cv2.GaussianBlur(np.roll(alpha, shift, (0, 1)), (0, 0), 3)
    background = mat * (1 - 0.45 * drop)[..., None]
    image = background * (1 - alpha[..., None]) + steel * alpha[..., None]
    return image, (warped[..., 3] if extra is not None else None)


def _nut_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    radius = 0.34 * size * rng.uniform(0.985, 1.015)
    part = _nut_part(rng, size, radius)
    theta = float(rng.uniform(0, 360))
    centre = ((size - 1) / 2.0 + rng.uniform(-4, 4, 2) * s).astype(np.float32)
    light = float(np.deg2rad(rng.uniform(-145, -105)))
    felt = _standardise(cv2.GaussianBlur(_crop_resize(rng, _grey_source("grass"), size, (0.5, 0.8)), (0, 0), 1.5))
    mat = _grey3(0.2 * (1 + 0.06 * felt), (0.95, 1.0, 1.1))
    lighting = _nut_lighting(size, centre, light)
    clean, _ = _render_nut(part, size, theta, centre, light, lighting, mat)
    acq = _acquisition(rng, **_INDUSTRIAL_CAMERA)
    if not anomalous:
        return _finish(acq, clean)
    c = (size - 1) / 2.0

    def on_face(lo: float, hi: float) -> np.ndarray:
        a = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(lo, hi) * radius
        return np.array([c + r * np.cos(a), c + r * np.sin(a)])

    def draw(kind: str, t: float):
        changed = _NutPart(part.value.copy(), part.alpha.copy(), part.chamfer)
        if kind == "scratch":
            p0 = on_face(0.45, 0.85)
            heading = rng.uniform(0, 2 * np.pi)
            length = _lerp(0.25, 0.7, t) * radius
            p2 = p0 + length * np.array([np.cos(heading), np.sin(heading)])
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.1 * length, 2)
            alpha = _polyline_alpha(size, _bezier(p0, p1, p2), [_lerp(1.5, 3.0, t) * s] * 31) * part.alpha
            changed.value += alpha * _lerp(0.25, 0.5, t) * rng.choice([-0.6, 1.0])
            local = alpha
        elif kind == "missing_part":
            k = rng.uniform(0, 6)
            a0, a1 = np.deg2rad(60 * np.floor(k)), np.deg2rad(60 * np.ceil(k + 1e-6))
            frac = k - np.floor(k)
            edge = (1 - frac) * np.array([np.cos(a0), np.sin(a0)]) + frac * np.array([np.cos(a1), np.sin(a1)])
            bite = _blob_alpha(rng, size, c + radius * edge, _lerp(0.12, 0.28, t) * radius, irregularity=0.35,
                               softness=0.05)
            changed.alpha *= 1 - bite
            local = bite * part.alpha
        elif kind == "stain":
            blob = _blob_alpha(rng, size, on_face(0.45, 0.8), _lerp(0.1, 0.22, t) * radius, irregularity=0.45,
                               softness=0.3)
            # Rust darkens the metal; the colour is added after rendering, below.
            changed.value *= 1 - blob * _lerp(0.15, 0.45, t)
            local = blob * part.alpha
        else:  # deformation: a dent; lit from the side, its far flank is bright, its near flank dark
            centre_d = on_face(0.5, 0.9)
            r = _lerp(0.14, 0.26, t) * radius
            wx, wy, disp = _local_warp(size, centre_d, r, _lerp(2, 5, t) * s, "pinch")
            towards = light + np.deg2rad(theta)  # the light's direction in the part's own frame
            xx, yy = _grid(size)
            dx, dy = xx - centre_d[0], yy - centre_d[1]
            shade = -_lerp(0.5, 0.9, t) * (dx * np.cos(towards) + dy * np.sin(towards)) / r * np.exp(
                -(dx * dx + dy * dy) / (r * r)) * (disp > 0)
            shade = shade.astype(np.float32)
            changed = _NutPart(_remap(changed.value, wx, wy) * (1 + shade), _remap(changed.alpha, wx, wy),
                               part.chamfer)
            local = ((np.abs(shade) > 0.03) | (disp > 1.0)).astype(np.float32) * part.alpha
        image, region = _render_nut(changed, size, theta, centre, light, lighting, mat, extra=local)
        if kind == "stain":
            rust = np.array([0.62, 0.34, 0.16], np.float32)
            a = (np.clip(region, 0, 1) * _lerp(0.25, 0.6, t))[..., None]
            image = image * (1 - a) + rust * image.mean(axis=2, keepdims=True) * 1.6 * a
        return image, region > 0.3

    return _finish(acq, clean, _seed_defect(rng, clean, ("scratch", "missing_part", "stain", "deformation"),
                                            (1, 1, 1, 1), draw))
