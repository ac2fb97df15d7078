"""S6, bi-temporal aerial change: the same place at two dates."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .base import Sample
from .raster import (
    _acquisition,
    _crop_resize,
    _dilate,
    _finish,
    _grey_source,
    _grid,
    _lerp,
    _poly_alpha,
    _polyline_alpha,
    _seed_defect,
    _smooth_field,
    _standardise,
)

# land cover -> (texture source, tint RGB, texture contrast)
_LAND_COVER = {
    "field": ("grass", (0.42, 0.55, 0.27), 0.45),
    "stubble": ("grass", (0.70, 0.64, 0.40), 0.4),
    "soil": ("gravel", (0.52, 0.40, 0.29), 0.35),
    "forest": ("grass", (0.18, 0.30, 0.15), 0.9),
    "paved": ("brick", (0.56, 0.56, 0.55), 0.3),
}
_ROOFS = ((0.66, 0.30, 0.20), (0.62, 0.62, 0.64), (0.86, 0.86, 0.83), (0.40, 0.45, 0.55), (0.55, 0.42, 0.32))


@lru_cache(maxsize=None)
def _mirror_tiled(name: str) -> np.ndarray:
    """A source texture mirrored into a seamless 2 x 2 tile, so that aerial crops can be seen
    from higher up (stones and grass blades smaller) than the photograph was taken."""
    src = _grey_source(name)
    tiled = np.block([[src, src[:, ::-1]], [src[::-1], src[::-1, ::-1]]])
    # Stored at half resolution: every crop is shrunk at least this much, and smaller is faster.
    return cv2.resize(tiled, (src.shape[1], src.shape[0]), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class _Building:
    x: float
    y: float
    w: float
    h: float
    angle: float          # degrees
    roof: tuple[float, float, float]


@dataclass
class _Place:
    """One place on the ground; what does not change between the two dates."""

    labels: np.ndarray                 # (size, size, 3) uint8 parcel index, repeated per channel
    covers: list[str]                  # land cover per parcel
    relief: np.ndarray                 # (size, size, 1) brightness: texture, crop rows, field edges
    roads: np.ndarray                  # (size, size) alpha
    asphalt: np.ndarray                # (size, size, 3) road surface
    buildings: list[_Building]
    occupied: np.ndarray               # (size, size) bool: roads and buildings, with a margin


def _box(b: _Building) -> np.ndarray:
    return cv2.boxPoints(((b.x, b.y), (b.w, b.h), b.angle))


def _roof_halves(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of a gabled roof; the ridge runs along the long side."""
    p0, p1, p2, p3 = box
    if np.linalg.norm(p1 - p0) < np.linalg.norm(p2 - p1):
        return (np.array([p0, p1, (p1 + p2) / 2, (p0 + p3) / 2]), np.array([(p0 + p3) / 2, (p1 + p2) / 2, p2, p3]))
    return (np.array([p0, (p0 + p1) / 2, (p2 + p3) / 2, p3]), np.array([(p0 + p1) / 2, p1, p2, (p2 + p3) / 2]))


def _shadow_outline(box: np.ndarray, sun: tuple[float, float]) -> np.ndarray:
    """The ground a building and its shadow cover; ``sun`` = (shadow direction rad, length px)."""
    offset = np.array([np.cos(sun[0]), np.sin(sun[0])]) * sun[1]
    return cv2.convexHull(np.vstack([box, box + offset]).astype(np.float32))[:, 0]


def _place_building(rng: np.random.Generator, size: int, occupied: np.ndarray, side: tuple[float, float],
                    angle: float) -> _Building | None:
    for _ in range(60):
        w, h = rng.uniform(*side), rng.uniform(*side) * rng.uniform(0.6, 1.0)
        b = _Building(float(rng.uniform(0.08, 0.92) * size), float(rng.uniform(0.08, 0.92) * size), w, h,
                      angle + float(rng.choice([0, 90])) + float(rng.uniform(-4, 4)),
                      _ROOFS[int(rng.integers(len(_ROOFS)))])
        corners = np.round(_box(b)).astype(int)
        inside = (corners >= 0).all() and (corners < size).all()
        if inside and not occupied[corners[:, 1], corners[:, 0]].any() and \
                not occupied[int(b.y), int(b.x)] and not (_poly_alpha(size, _box(b)) > 0)[occupied].any():
            return b
    return None


def _new_place(rng: np.random.Generator, size: int) -> _Place:
    s = size / 256
    xx, yy = _grid(size)
    n = int(rng.integers(5, 10))
    seeds = rng.uniform(0, size, (n, 2)).astype(np.float32)
    # Warped distances give parcels organic, not straight Voronoi, borders.
    wx = xx + _smooth_field(rng, size, 40 * s) * 10 * s
    wy = yy + _smooth_field(rng, size, 40 * s) * 10 * s
    labels = np.argmin((wx[None] - seeds[:, 0, None, None]) ** 2 + (wy[None] - seeds[:, 1, None, None]) ** 2, axis=0)
    edge = np.zeros((size, size), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    # Field edges (hedges, tracks) are darker.
    relief = 1 - 0.3 * cv2.GaussianBlur(edge.astype(np.float32), (0, 0), 0.7 * s)
    covers = [str(c) for c in rng.choice(list(_LAND_COVER), size=n, p=[0.3, 0.15, 0.2, 0.2, 0.15])]
    pattern = np.zeros((size, size), np.float32)
    for k, cover in enumerate(covers):
        source, _, contrast = _LAND_COVER[cover]
        texture = 0.25 * contrast * _standardise(_crop_resize(rng, _mirror_tiled(source), size, (0.5, 0.9)))
        region = labels == k
        pattern[region] = texture[region]
        if cover in ("field", "stubble"):  # crop rows
            a, period = rng.uniform(0, np.pi), rng.uniform(4, 8) * s
            pattern[region] += 0.07 * np.sin(2 * np.pi * (xx[region] * np.cos(a) + yy[region] * np.sin(a)) / period)
    roads = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < 0.5:
            pts = [(0, rng.uniform(0.1, 0.9) * size), (rng.uniform(0.3, 0.7) * size, rng.uniform(0.2, 0.8) * size),
                   (size - 1, rng.uniform(0.1, 0.9) * size)]
        else:
            pts = [(rng.uniform(0.1, 0.9) * size, 0), (rng.uniform(0.2, 0.8) * size, rng.uniform(0.3, 0.7) * size),
                   (rng.uniform(0.1, 0.9) * size, size - 1)]
        roads = np.maximum(roads, _polyline_alpha(size, np.asarray(pts), [rng.uniform(5, 8) * s] * 2))
    grain = _standardise(_crop_resize(rng, _mirror_tiled("gravel"), size, (0.5, 0.9)))
    asphalt = np.array([0.45, 0.45, 0.47], np.float32) * (1 + 0.05 * grain)[..., None]
    occupied = _dilate(roads > 0.1, int(3 * s) + 1)
    buildings = []
    main_angle = float(rng.uniform(0, 90))
    for _ in range(int(rng.integers(3, 8))):
        b = _place_building(rng, size, occupied, (11 * s, 26 * s), main_angle)
        if b is not None:
            buildings.append(b)
            occupied |= _dilate(_poly_alpha(size, _box(b)) > 0, int(6 * s) + 1)
    labels3 = np.repeat(labels.astype(np.uint8)[..., None], 3, axis=2)
    return _Place(labels3, covers, (relief * (1 + pattern))[..., None], roads, asphalt, buildings, occupied)


def _render_place(place: _Place, size: int, tints: np.ndarray, sun: tuple[float, float]) -> np.ndarray:
    """The ground seen from above on one date: ``tints`` (n_parcels, 3) colours the parcels."""
    lut = np.zeros((1, 256, 3), np.float32)
    lut[0, :len(tints)] = tints
    image = cv2.LUT(place.labels, lut) * place.relief
    a = place.roads[..., None]
    image = image * (1 - a) + place.asphalt * a
    # Buildings are drawn premultiplied on 8-bit canvases, where OpenCV anti-aliases polygons.
    shadow = np.zeros((size, size), np.uint8)
    cover = np.zeros((size, size), np.uint8)
    paint = np.zeros((size, size, 3), np.uint8)
    for b in place.buildings:
        box = _box(b)
        cv2.fillConvexPoly(shadow, np.round(_shadow_outline(box, sun) * 16).astype(np.int32), 255, cv2.LINE_AA, 4)
        for half, light in zip(_roof_halves(box), (1.08, 0.86)):
            pts = np.round(half * 16).astype(np.int32)
            cv2.fillConvexPoly(paint, pts, tuple(min(255.0, 255.0 * c * light) for c in b.roof), cv2.LINE_AA, 4)
            cv2.fillConvexPoly(cover, pts, 255, cv2.LINE_AA, 4)
    image *= (1 - 0.5 / 255 * shadow.astype(np.float32))[..., None]
    return image * (1 - cover.astype(np.float32) / 255)[..., None] + paint.astype(np.float32) / 255


def _season(rng: np.random.Generator, place: _Place, change: float) -> np.ndarray:
    """Parcel colours (n_parcels, 3) for one date: with chance ``change`` a field has ripened or
    greened part of the way; every colour drifts a few percent."""
    tints = []
    for cover in place.covers:
        tint = np.asarray(_LAND_COVER[cover][1])
        if cover in ("field", "stubble") and rng.random() < change:
            other = np.asarray(_LAND_COVER["stubble" if cover == "field" else "field"][1])
            tint = tint + rng.uniform(0.3, 0.6) * (other - tint)
        tints.append(tint * rng.uniform(0.95, 1.05, 3))
    return np.asarray(tints, np.float32)


def _aerial_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    place = _new_place(rng, size)
    sun_dir = rng.uniform(0, 2 * np.pi)
    sun_before = (sun_dir, rng.uniform(3, 6) * s)
    sun_after = (sun_dir + rng.uniform(-0.2, 0.2), sun_before[1] + rng.uniform(-1.5, 1.5) * s)
    before = _render_place(place, size, _season(rng, place, 0.0), sun_before)
    tints_after = _season(rng, place, 0.3)
    # The two passes are co-registered to within a couple of pixels.
    reg = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-0.4, 0.4), rng.uniform(0.996, 1.004))
    reg[:, 2] += rng.uniform(-1.5, 1.5, 2) * s

    def register(image: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(image, reg, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)

    acq_before = _acquisition(rng, gain=(0.88, 1.12), tint=0.05, offset=(-0.02, 0.04), blur=(0.0, 0.8))
    acq_after = _acquisition(rng, gain=(0.88, 1.12), tint=0.05, offset=(-0.02, 0.04), blur=(0.0, 0.8))
    reference = acq_before.apply(before)
    clean = register(_render_place(place, size, tints_after, sun_after))
    if not anomalous:
        return _finish(acq_after, clean, reference=reference)

    def draw(kind: str, t: float):
        if kind == "demolished_building":
            k = int(rng.integers(len(place.buildings)))
            changed, outlines = place.buildings[:k] + place.buildings[k + 1:], [_box(place.buildings[k])]
        else:
            added, occupied = [], place.occupied.copy()
            for _ in range(1 if rng.random() < 0.6 else int(rng.integers(2, 4))):
                b = _place_building(rng, size, occupied, (_lerp(8, 16, t) * s, _lerp(12, 26, t) * s),
                                    place.buildings[0].angle if place.buildings else 0.0)
                if b is not None:
                    added.append(b)
                    occupied |= _dilate(_poly_alpha(size, _box(b)) > 0, int(4 * s) + 1)
            changed, outlines = place.buildings + added, [_box(b) for b in added]
        footprint = np.zeros((size, size), np.float32)
        for box in outlines:
            footprint = np.maximum(footprint, _poly_alpha(size, _shadow_outline(box, sun_after)))
        image = register(_render_place(_Place(**{**place.__dict__, "buildings": changed}), size, tints_after, sun_after))
        return image, register(footprint) > 0.3

    kinds = ("new_building", "demolished_building") if place.buildings else ("new_building",)
    return _finish(acq_after, clean, _seed_defect(rng, clean, kinds, (2, 1)[:len(kinds)], draw),
                   reference=reference)
