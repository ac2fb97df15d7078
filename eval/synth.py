"""The bundled synthetic benchmark: seven domains built from images scikit-image ships, with
seeded defects, pixel masks and normal variation, written as a movable manifest folder.

Every domain renders a *scene* (what is there), then an *acquisition* (light, colour, focus,
sensor noise). Normal images vary the way normal images do in that field: crops and shifts,
rotation where the object rotates, anatomy between "patients", season and registration between
two satellite passes. An anomalous image is the same scene and acquisition with one seeded
defect; its mask marks every pixel the defect changed (255 = anomalous). Output is
deterministic in ``seed``: same seed, same bytes.

    >>> from anomalyclaw.eval.synth import generate_benchmark
    >>> manifest_path = generate_benchmark("synth", seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import color, data, filters, measure, morphology, segmentation

from anomalyclaw.domains import DomainCard
from anomalyclaw.errors import ConfigError
from anomalyclaw.eval.manifests import write_manifest
from anomalyclaw.imaging import save_image
from anomalyclaw.items import Item

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


# ----------------------------------------------------------------------------------------------
# Sources (scikit-image ships them; loaded once per process)


@lru_cache(maxsize=None)
def _grey_source(name: str) -> np.ndarray:
    """A greyscale scikit-image picture as float32 (H, W) in [0, 1]."""
    return np.ascontiguousarray(getattr(data, name)(), dtype=np.float32) / 255.0


@lru_cache(maxsize=None)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (xx, yy), each float32 (size, size); read-only, shared."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


# ----------------------------------------------------------------------------------------------
# Random fields, geometry, acquisition


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field (size, size) float32 with correlation length ``scale`` px."""
    cells = max(2, int(round(size / max(scale, 1.0))) + 2)
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / (field.std() + 1e-6)


def _geometry_map(size: int, src_size: int, *, angle: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                  shift: tuple[float, float] = (0.0, 0.0), flip: bool = False,
                  elastic: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps from a (size, size) output to a (src_size, src_size) source: rotation
    by ``angle`` degrees, per-axis ``scale`` and ``shift`` (output px) about the centre, an
    optional mirror and an elastic displacement field (output px)."""
    xx, yy = _grid(size)
    c = (size - 1) / 2.0
    x = xx - c - shift[0]
    y = yy - c - shift[1]
    a = np.deg2rad(angle)
    xr = (np.cos(a) * x + np.sin(a) * y) / scale[0]
    yr = (-np.sin(a) * x + np.cos(a) * y) / scale[1]
    if flip:
        xr = -xr
    if elastic is not None:
        xr = xr + elastic[0]
        yr = yr + elastic[1]
    k = src_size / size
    cs = (src_size - 1) / 2.0
    return (xr * k + cs).astype(np.float32), (yr * k + cs).astype(np.float32)


def _local_warp(size: int, centre: Sequence[float], radius: float, amount: float, kind: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A local deformation with peak displacement ``amount`` px at ``radius``/sqrt(2) from
    ``centre``: ``bulge`` magnifies, ``pinch`` shrinks, ``swirl`` twists. Returns the remap
    maps and the displacement magnitude (size, size) in px."""
    xx, yy = _grid(size)
    dx = xx - np.float32(centre[0])
    dy = yy - np.float32(centre[1])
    falloff = np.exp(-(dx * dx + dy * dy) / np.float32(radius * radius))
    falloff[falloff < 1e-3] = 0  # exactly no change beyond ~2.6 radii, not a sub-pixel ripple
    # r * exp(-r^2/R^2) peaks at R/sqrt(2) with value 0.43 R: scale so the peak is `amount`.
    strength = np.float32(amount / (0.4289 * radius)) * falloff
    if kind == "swirl":
        cos_t, sin_t = np.cos(strength), np.sin(strength)
        src_x = centre[0] + cos_t * dx - sin_t * dy
        src_y = centre[1] + sin_t * dx + cos_t * dy
    elif kind in ("bulge", "pinch"):
        sign = -1.0 if kind == "bulge" else 1.0
        src_x = xx + sign * strength * dx
        src_y = yy + sign * strength * dy
    else:
        raise ValueError(f"unknown warp kind {kind!r}")
    src_x = src_x.astype(np.float32)
    src_y = src_y.astype(np.float32)
    return src_x, src_y, np.hypot(src_x - xx, src_y - yy)


def _remap(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, *, border: int = cv2.BORDER_REFLECT101
           ) -> np.ndarray:
    """Bilinear ``cv2.remap``; outside the source is mirrored, or black with BORDER_CONSTANT."""
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=border, borderValue=0)


@dataclass(frozen=True)
class _Acquisition:
    """How one image was taken: per-channel gain, offset, gamma, vignetting, focus blur and
    sensor noise (std in [0, 1] units; ``noise_grain`` px correlates it, as CT noise is)."""

    gain: tuple[float, float, float]
    offset: float
    gamma: float
    vignette: float
    blur_sigma: float
    noise_sigma: float
    noise_grain: float
    noise_window: tuple[int, int, int, int]   # row and column offset in the noise bank, flips
    grey: bool

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Float (H, W, 3) in [0, 1] -> uint8 (H, W, 3); ``image`` is left unchanged."""
        out = cv2.GaussianBlur(image, (0, 0), self.blur_sigma) if self.blur_sigma > 0.25 else image
        # In-place ufuncs: this runs on every image written, and np.clip is several times slower.
        out = out * np.asarray(self.gain, np.float32)
        out += np.float32(self.offset)
        np.maximum(out, 0.0, out=out)
        np.minimum(out, 1.0, out=out)
        out = cv2.pow(out, self.gamma)
        h, w = out.shape[:2]
        if self.vignette > 0:
            xx, yy = _grid(h)
            c = (h - 1) / 2.0
            out *= (1.0 - np.float32(self.vignette / (c * c)) * ((xx - c) ** 2 + (yy - c) ** 2))[..., None]
        dy, dx, flip_rows, flip_cols = self.noise_window
        noise = _noise_bank(h)[dy:dy + h, dx:dx + w, :1 if self.grey else 3]
        noise = noise[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]
        if self.noise_grain > 0:
            noise = cv2.GaussianBlur(noise, (0, 0), self.noise_grain).reshape(h, w, -1)
            noise /= noise.std() + 1e-6
        out += noise * np.float32(self.noise_sigma)
        out *= 255.0
        out += 0.5
        np.maximum(out, 0.0, out=out)
        np.minimum(out, 255.0, out=out)
        return out.astype(np.uint8)


_NOISE_MARGIN = 128


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Standard normal noise (size + margin, size + margin, 3) float32 from a fixed seed. Each
    image takes its sensor noise from a random window of it, flipped at random: drawing fresh
    Gaussian noise per image cost more than rendering most scenes."""
    side = size + _NOISE_MARGIN
    return np.random.default_rng(0x5EED).standard_normal((side, side, 3), dtype=np.float32)


#: A fixed industrial camera: lighting and exposure drift only a little between shots.
_INDUSTRIAL_CAMERA = dict(gain=(0.95, 1.05), tint=0.01, offset=(-0.01, 0.01), gamma=(0.95, 1.05), blur=(0.0, 0.35),
                          noise=(0.008, 0.015))


def _acquisition(rng: np.random.Generator, *, gain=(0.9, 1.1), tint: float = 0.03, offset=(-0.02, 0.02),
                 gamma=(0.88, 1.14), vignette=(0.0, 0.0), blur=(0.0, 0.7), noise=(0.008, 0.02),
                 noise_grain: float = 0.0, grey: bool = False) -> _Acquisition:
    """Draw one acquisition; each argument is the (low, high) range of a setting (``tint``: the
    per-channel gain spread)."""
    g = rng.uniform(*gain)
    t = (0.0, 0.0, 0.0) if grey else tuple(rng.uniform(-tint, tint, 3))
    return _Acquisition(
        gain=tuple(float(g * (1.0 + ti)) for ti in t), offset=float(rng.uniform(*offset)),
        gamma=float(rng.uniform(*gamma)), vignette=float(rng.uniform(*vignette)),
        blur_sigma=float(rng.uniform(*blur)), noise_sigma=float(rng.uniform(*noise)),
        noise_grain=noise_grain, noise_window=tuple(int(v) for v in rng.integers(0, [_NOISE_MARGIN] * 2 + [2, 2])),
        grey=grey)


# ----------------------------------------------------------------------------------------------
# Drawing primitives (float alpha maps in [0, 1], shape (size, size))


def _poly_alpha(size: int, points: np.ndarray) -> np.ndarray:
    """Anti-aliased filled polygon (points in px, any order around the outline)."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(points) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _disc_alpha(size: int, centre: Sequence[float], radius: float) -> np.ndarray:
    """Anti-aliased disc (one-pixel soft edge)."""
    xx, yy = _grid(size)
    r = np.hypot(xx - centre[0], yy - centre[1])
    return np.clip(radius + 0.5 - r, 0.0, 1.0)


def _blob_alpha(rng: np.random.Generator, size: int, centre: Sequence[float], radius: float, *,
                irregularity: float = 0.3, softness: float = 0.2, aspect: float = 1.0,
                angle: float = 0.0) -> np.ndarray:
    """An irregular soft-edged blob: a star-shaped polygon with smoothly varying radius,
    stretched by ``aspect`` along ``angle`` (radians), blurred by ``softness`` * radius."""
    n = 24
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    harmonics = sum(rng.normal(0, irregularity / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                    for k in (2, 3, 5))
    r = radius * np.clip(1.0 + harmonics, 0.35, 1.8)
    x, y = r * np.cos(theta) * np.sqrt(aspect), r * np.sin(theta) / np.sqrt(aspect)
    ca, sa = np.cos(angle), np.sin(angle)
    pts = np.stack([centre[0] + ca * x - sa * y, centre[1] + sa * x + ca * y], axis=1)
    alpha = _poly_alpha(size, pts)
    if softness > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.5, softness * radius))
    return alpha


def _polyline_alpha(size: int, points: np.ndarray, widths: Sequence[float]) -> np.ndarray:
    """Anti-aliased polyline whose segment i has thickness ``widths[i]`` px."""
    canvas = np.zeros((size, size), np.uint8)
    p = np.round(np.asarray(points) * 16).astype(np.int32)
    for i in range(len(p) - 1):
        cv2.line(canvas, tuple(p[i]), tuple(p[i + 1]), 255, max(1, int(round(widths[i]))), cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _crack_alpha(rng: np.random.Generator, size: int, start: Sequence[float], length: float, width: float,
                 *, wander: float = 0.35, branch: bool = True) -> np.ndarray:
    """A crack: a random walk of ``length`` px that tapers at both ends, optionally branching."""
    step = max(2.0, size / 96)
    n = max(3, int(length / step))
    heading = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, wander, n))
    pts = np.asarray(start, np.float64) + np.cumsum(
        np.stack([np.cos(heading + turns), np.sin(heading + turns)], 1) * step, 0)
    pts = np.vstack([start, pts])
    taper = np.sin(np.linspace(0.15, np.pi - 0.15, len(pts) - 1))
    alpha = _polyline_alpha(size, pts, width * (0.5 + 0.7 * taper))
    if branch and n > 8 and rng.random() < 0.5:
        at = int(rng.integers(n // 3, 2 * n // 3))
        alpha = np.maximum(alpha, _crack_alpha(rng, size, pts[at], length * rng.uniform(0.25, 0.45),
                                               width * 0.7, wander=wander, branch=False))
    return cv2.GaussianBlur(alpha, (0, 0), 0.6)


def _bezier(p0, p1, p2, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)


def _pick(rng: np.random.Generator, allowed: np.ndarray) -> tuple[float, float] | None:
    """A random (x, y) pixel where ``allowed`` (bool (H, W)) is true, or None."""
    ys, xs = np.nonzero(allowed)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def _inside(mask: np.ndarray, margin: float) -> np.ndarray:
    """Pixels of ``mask`` at least ``margin`` px from its outside."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    return dist > margin


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _visible(clean: np.ndarray, defect: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a drawn defect is a usable ground truth: a mask of sensible area inside which the
    image really changed (90th percentile of the change >= 0.04, about 10 grey levels)."""
    area = mask.mean()
    if mask.sum() < 6 or area > 0.35:
        return False
    change = np.abs(defect - clean)
    change = change.max(axis=2) if change.ndim == 3 else change
    return float(np.percentile(change[mask], 90)) >= 0.04


#: A pixel counts as changed by a defect where some channel moved by more than this (8 grey levels).
CHANGE_THRESHOLD = 0.03


def _complete_mask(clean: np.ndarray, defect: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The drawn outline, grown to every nearby pixel the defect changed by more than
    :data:`CHANGE_THRESHOLD`: soft edges, blur and warps reach past a shape's outline."""
    change = np.abs(defect - clean)
    change = (change.max(axis=2) if change.ndim == 3 else change) > CHANGE_THRESHOLD
    grown = mask | (change & _dilate(mask, max(2, round(0.04 * mask.shape[0]))))
    # Closing joins the patchy change of a warped texture into one region.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    return cv2.morphologyEx(grown.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0


def _seed_defect(rng: np.random.Generator, clean: np.ndarray, kinds: Sequence[str], weights: Sequence[float],
                 draw: Callable[[str, float], tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Pick an anomaly type and draw it (``draw(kind, severity) -> (defect image, mask)``),
    redrawing until it is visible; returns (defect image, bool mask, kind, severity)."""
    p = np.asarray(weights, np.float64)
    kind = str(rng.choice(list(kinds), p=p / p.sum()))
    for _ in range(12):
        severity = float(rng.uniform())
        defect, mask = draw(kind, severity)
        mask = _complete_mask(clean, defect, mask)
        if _visible(clean, defect, mask):
            return defect, mask, kind, severity
    raise RuntimeError(f"could not draw a visible {kind!r} defect in 12 tries (a generator bug)")


def _finish(acq: _Acquisition, clean: np.ndarray, defect: tuple | None = None,
            reference: np.ndarray | None = None) -> Sample:
    clean_u8 = acq.apply(clean)
    if defect is None:
        return Sample(image=clean_u8, clean=clean_u8, reference=reference)
    image, mask, kind, severity = defect
    return Sample(image=acq.apply(image), clean=clean_u8, mask=mask, anomaly_type=kind,
                  severity=round(severity, 3), reference=reference)


def _crop_resize(rng: np.random.Generator, source: np.ndarray, size: int, side: tuple[float, float]) -> np.ndarray:
    """A random square crop of ``side`` (fraction of the shorter source side), resized to
    (size, size), randomly rotated by a multiple of 90 degrees and mirrored."""
    h, w = source.shape[:2]
    c = int(min(h, w) * rng.uniform(*side))
    y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    interp = cv2.INTER_AREA if c > size else cv2.INTER_LINEAR
    out = np.rot90(cv2.resize(source[y0:y0 + c, x0:x0 + c], (size, size), interpolation=interp), int(rng.integers(4)))
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-6)


def _grey3(grey: np.ndarray, tint: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    return grey[..., None] * np.asarray(tint, np.float32)


# ----------------------------------------------------------------------------------------------
# S1 texture surface: gravel aggregate (asphalt / concrete-like)


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


# ----------------------------------------------------------------------------------------------
# S2 coin tray: exactly 12 coins in 3 rows of 4 (counting, layout)


@dataclass(frozen=True)
class _CoinKit:
    plate: np.ndarray                 # coin-free background, float32 (303, 376)
    sprites: tuple[np.ndarray, ...]   # each float32 (h, w, 2): grey value, alpha
    diameters: tuple[float, ...]      # px in the source photograph


@lru_cache(maxsize=1)
def _coin_kit() -> _CoinKit:
    """Coins cut out of ``skimage.data.coins()`` (sorted by size) and the tray without them."""
    photo = _grey_source("coins")[:, :376]  # the rightmost columns are the slide's dark frame
    # Watershed from sure-background and sure-coin markers on the gradient, as in the
    # scikit-image coins tutorial; every coin is convex, so its hull repairs dark patches.
    markers = np.zeros(photo.shape, np.int32)
    markers[photo < 30 / 255] = 1
    markers[photo > 150 / 255] = 2
    found = ndi.binary_fill_holes(segmentation.watershed(filters.sobel(photo), markers) == 2)
    labelled = measure.label(morphology.opening(found, morphology.disk(3)))
    coins = np.zeros(photo.shape, bool)
    sprites, diameters = [], []
    for region in measure.regionprops(labelled):
        if region.area < 500:
            continue
        y0, x0, y1, x1 = region.bbox
        coins[y0:y1, x0:x1] |= region.image_convex
        pad = 3
        y0, x0 = max(0, y0 - pad), max(0, x0 - pad)
        y1, x1 = min(photo.shape[0], y1 + pad), min(photo.shape[1], x1 + pad)
        hull = np.zeros(photo.shape, np.float32)
        hull[region.bbox[0]:region.bbox[2], region.bbox[1]:region.bbox[3]] = region.image_convex
        alpha = cv2.GaussianBlur(hull[y0:y1, x0:x1], (0, 0), 0.8)
        sprites.append(np.dstack([photo[y0:y1, x0:x1], alpha]))
        diameters.append(float(region.equivalent_diameter_area))
    # The empty tray: the photograph where there is no coin, filled in (normalised convolution)
    # from the surrounding background where there is.
    background = (~_dilate(coins, 10)).astype(np.float32)
    estimate = cv2.GaussianBlur(photo * background, (0, 0), 12) / (cv2.GaussianBlur(background, (0, 0), 12) + 1e-6)
    plate = photo * background + estimate * (1 - background)
    order = np.argsort(diameters)
    return _CoinKit(plate=plate, sprites=tuple(sprites[i] for i in order),
                    diameters=tuple(diameters[i] for i in order))


@dataclass(frozen=True)
class _Coin:
    sprite: int
    x: float
    y: float
    angle: float
    diameter: float  # rendered diameter, px


_COIN_ROWS, _COIN_COLS = 3, 4


def _coin_slots(kit: _CoinKit) -> list[int]:
    """The fixed coin of each slot, row by row: small coins on top, large at the bottom."""
    picks = np.linspace(0, len(kit.sprites) - 1, _COIN_ROWS * _COIN_COLS).round().astype(int)
    return [int(i) for i in picks]


@lru_cache(maxsize=None)
def _coin_plate(size: int) -> np.ndarray:
    return cv2.resize(_coin_kit().plate, (size, size), interpolation=cv2.INTER_AREA)


def _render_coins(kit: _CoinKit, size: int, coins: Sequence[_Coin], shading: np.ndarray
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The tray image float (size, size, 3) and each coin's alpha (size, size)."""
    image = _coin_plate(size) * shading
    alphas = []
    for coin in coins:
        sprite = kit.sprites[coin.sprite]
        h, w = sprite.shape[:2]
        k = coin.diameter / kit.diameters[coin.sprite]
        # Render into a window around the coin (with room for its shadow), not the whole tray.
        half = int(np.ceil(0.5 * np.hypot(h, w) * k)) + 8
        x0, y0 = int(coin.x) - half, int(coin.y) - half
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), coin.angle, k)
        m[:, 2] += (coin.x - x0 - (w - 1) / 2, coin.y - y0 - (h - 1) / 2)
        warped = cv2.warpAffine(sprite, m, (2 * half + 1, 2 * half + 1), flags=cv2.INTER_LINEAR, borderValue=0)
        value, alpha = warped[..., 0], warped[..., 1]
        # A faint contact shadow on the tray, down-right of the coin.
        shadow = cv2.GaussianBlur(np.roll(alpha, (2, 2), (0, 1)), (0, 0), 2.0)
        cy0, cx0 = max(0, y0), max(0, x0)
        cy1, cx1 = min(size, y0 + 2 * half + 1), min(size, x0 + 2 * half + 1)
        win = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        canvas = (slice(cy0, cy1), slice(cx0, cx1))
        a = alpha[win]
        image[canvas] = image[canvas] * (1 - 0.25 * shadow[win]) * (1 - a) + value[win] * a
        full = np.zeros((size, size), np.float32)
        full[canvas] = a
        alphas.append(full)
    return _grey3(image, (1.0, 0.98, 0.95)), alphas


def _coin_sample(rng: np.random.Generator, size: int, anomalous: bool) -> Sample:
    s = size / 256
    kit = _coin_kit()
    slots = _coin_slots(kit)
    # The largest slot coin is 46 px across at 256 px; every coin keeps its relative size.
    px_per_src = 46 * s / kit.diameters[slots[-1]]
    shift = rng.uniform(-2, 2, 2) * s
    coins = []
    for k, sprite in enumerate(slots):
        row, col = divmod(k, _COIN_COLS)
        x = (col + 0.5) * size / _COIN_COLS + shift[0] + rng.uniform(-1, 1) * s
        y = (row + 0.5) * size / _COIN_ROWS + shift[1] + rng.uniform(-1, 1) * s
        coins.append(_Coin(sprite, x, y, float(rng.uniform(-10, 10)),
                           kit.diameters[sprite] * px_per_src * float(rng.uniform(0.97, 1.03))))
    shading = 1.0 + rng.uniform(0.03, 0.1) * _smooth_field(rng, size, size / 2)
    clean, clean_alphas = _render_coins(kit, size, coins, shading)
    acq = _acquisition(rng, **_INDUSTRIAL_CAMERA)
    if not anomalous:
        return _finish(acq, clean)

    def footprint(alpha: np.ndarray) -> np.ndarray:
        return _dilate(alpha > 0.3, max(1, round(2 * s)))

    def draw(kind: str, t: float):
        changed = list(coins)
        k = int(rng.integers(len(coins)))
        if kind == "missing_part":
            del changed[k]
            image, _ = _render_coins(kit, size, changed, shading)
            return image, footprint(clean_alphas[k])
        if kind == "extra_part":
            spare = [i for i in range(len(kit.sprites)) if i not in slots]
            sprite = int(rng.choice(spare))
            gap_row = int(rng.integers(1, _COIN_ROWS))
            extra = _Coin(sprite, float(rng.uniform(0.1, 0.9) * size),
                          gap_row * size / _COIN_ROWS + shift[1] + rng.uniform(-3, 3) * s,
                          float(rng.uniform(0, 360)), _lerp(24, 40, t) * s)
            image, alphas = _render_coins(kit, size, changed + [extra], shading)
            return image, footprint(alphas[-1])
        if kind == "misplaced_part":
            heading = rng.uniform(0, 2 * np.pi)
            dist = _lerp(7, 22, t) * s
            c = coins[k]
            changed[k] = _Coin(c.sprite, c.x + dist * np.cos(heading), c.y + dist * np.sin(heading),
                               c.angle, c.diameter)
        else:  # size_change: a wrong-sized part in the slot
            c = coins[k]
            factor = float(np.exp(rng.choice([-1, 1]) * _lerp(0.12, 0.35, t)))
            changed[k] = _Coin(c.sprite, c.x, c.y, c.angle, c.diameter * factor)
        image, alphas = _render_coins(kit, size, changed, shading)
        return image, footprint(np.maximum(clean_alphas[k], alphas[k]))

    return _finish(acq, clean, _seed_defect(
        rng, clean, ("missing_part", "extra_part", "misplaced_part", "size_change"), (1, 1, 1, 1), draw))


# ----------------------------------------------------------------------------------------------
# S3 CT phantom: Shepp-Logan head slices of different "patients"


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


# ----------------------------------------------------------------------------------------------
# S4 retina fundus photographs


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


# ----------------------------------------------------------------------------------------------
# S5 histology: immunohistochemistry (DAB + haematoxylin) fields of view


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


# ----------------------------------------------------------------------------------------------
# S6 bi-temporal aerial change: the same place at two dates


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


# ----------------------------------------------------------------------------------------------
# S7 rotating part: a hex nut at any in-plane rotation


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


# ----------------------------------------------------------------------------------------------
# The domain table


#: The synthetic domains, keyed by code. Cards say what normal is; traits drive the tools.
DOMAINS: dict[str, SynthDomain] = {d.code: d for d in [
    SynthDomain(
        "S1", "texture_surface", "gravel", ("gravel", "grass"),
        ("crack", "stain", "texture_change", "deformation"),
        DomainCard("S1", "synthetic texture surface (gravel aggregate)", "RGB photograph",
                   "a uniform gravel-aggregate surface like the references: the same stone size, colour and "
                   "grain; gentle uneven lighting and a different patch of the surface are normal",
                   "cracks, stains or spills, a patch of different material or grain, a local bulge or dent",
                   traits=frozenset({"texture"})),
        _texture_sample),
    SynthDomain(
        "S2", "coin_count", "coin_tray", ("coins",),
        ("missing_part", "extra_part", "misplaced_part", "size_change"),
        DomainCard("S2", "synthetic coin tray (counting)", "greyscale photograph",
                   "exactly 12 coins in 3 rows of 4, each coin in its own slot, the same coin in the same slot "
                   "as in the references; small shifts, turned coin faces and lighting are normal",
                   "a missing coin, an extra coin, a coin out of its slot, a coin of the wrong size",
                   traits=frozenset({"object", "aligned", "counting"})),
        _coin_sample),
    SynthDomain(
        "S3", "ct_phantom", "head_phantom", ("shepp_logan_phantom",),
        ("lesion", "mass_effect"),
        DomainCard("S3", "synthetic head CT (Shepp-Logan phantom)", "CT slice",
                   "a head slice with the references' structures and densities; head size, pose, shape and "
                   "noise differ between patients",
                   "a focal lesion darker or brighter than the tissue around it, or structures pushed aside "
                   "by a mass (mass effect)", traits=frozenset({"medical"})),
        _ct_sample),
    SynthDomain(
        "S4", "retina_fundus", "fundus", ("retina",),
        ("haemorrhage", "exudate", "cotton_wool_spot"),
        DomainCard("S4", "synthetic retinal fundus photograph", "fundus RGB",
                   "a healthy retina: optic disc, vessels and macula; left or right eye, rotation, "
                   "pigmentation, camera colour and illumination differ between patients",
                   "haemorrhages (dark red blots), hard exudates (yellow-white specks), cotton-wool spots "
                   "(pale fluffy patches)", traits=frozenset({"medical"})),
        _retina_sample),
    SynthDomain(
        "S5", "histology_ihc", "immunohistochemistry", ("immunohistochemistry",),
        ("atypical_nuclei", "abnormal_stain", "tissue_tear"),
        DomainCard("S5", "synthetic histology (immunohistochemistry, DAB + haematoxylin)", "microscopy RGB",
                   "tissue like the references: brown-stained glands, blue nuclei of normal size, pale stroma "
                   "and lumen; field of view, orientation and stain strength vary",
                   "enlarged dark (atypical) nuclei, a patch of over- or under-staining, a tear in the tissue",
                   traits=frozenset({"medical", "texture"})),
        _histology_sample),
    SynthDomain(
        "S6", "aerial_change", "farmland", ("grass", "gravel", "brick"),
        ("new_building", "demolished_building"),
        DomainCard("S6", "synthetic aerial change (bi-temporal)", "aerial RGB",
                   "the same place as in the earlier image: crops grown or harvested, different light, "
                   "shadows and a registration error of a few pixels are normal",
                   "a building that appeared or disappeared (the mask covers its roof and shadow)",
                   reference_type="bi_temporal", traits=frozenset({"aerial", "bi_temporal", "aligned"})),
        _aerial_sample),
    SynthDomain(
        "S7", "rotating_nut", "hex_nut", ("gravel", "grass"),
        ("scratch", "missing_part", "stain", "deformation"),
        DomainCard("S7", "synthetic machined hex nut", "RGB photograph",
                   "an intact brushed-steel hex nut with a stamped 'M8' mark, at any in-plane rotation and "
                   "small offset, lit from the top left",
                   "scratches, a chipped-off piece, rust stains, dents", traits=frozenset({"object", "rotating"})),
        _nut_sample),
]}


def _choose_domains(domains: Sequence[str] | None) -> list[SynthDomain]:
    if domains is None:
        return list(DOMAINS.values())
    if isinstance(domains, str):
        domains = domains.split(",")
    by_name = {d.name: d for d in DOMAINS.values()}
    chosen = []
    for key in domains:
        key = key.strip()
        dom = DOMAINS.get(key.upper()) or by_name.get(key)
        if dom is None:
            known = ", ".join(f"{d.code} ({d.name})" for d in DOMAINS.values())
            raise ConfigError(f"unknown synthetic domain {key!r}; choose codes or names from: {known}")
        if dom not in chosen:
            chosen.append(dom)
    if not chosen:
        raise ConfigError("domains is empty: pass None for all synthetic domains or name at least one")
    return chosen


# ----------------------------------------------------------------------------------------------
# Writing the benchmark


def _split_plan(rng: np.random.Generator, counts: dict[str, int]) -> list[tuple[str, int]]:
    """(split, label) per item: each split about half anomalous, in shuffled order."""
    plan = []
    for split, n in counts.items():
        labels = np.array([1] * (n // 2) + [0] * (n - n // 2))
        rng.shuffle(labels)
        plan.extend((split, int(label)) for label in labels)
    return plan


def _domain_folder(out_dir: Path, dom: SynthDomain) -> Path:
    return out_dir / f"{dom.code}_{dom.name}"


def _reference_path(out_dir: Path, dom: SynthDomain, i: int) -> Path:
    return _domain_folder(out_dir, dom) / "references" / f"{dom.code}_ref_{i:02d}.png"


def _write_reference(dom: SynthDomain, out_dir: Path, seed: int, i: int, size: int) -> None:
    """Render and write normal reference ``i`` of the domain's pool."""
    ref = dom.sample(np.random.default_rng([seed, int(dom.code[1:]), 1_000_000 + i]), size, False)
    save_image(ref.image, _reference_path(out_dir, dom, i))


def _write_item(dom: SynthDomain, out_dir: Path, seed: int, index: int, split: str, label: int, size: int) -> Item:
    """Render and write item ``index`` of the domain (its own random stream, so items can be
    made in any order or in parallel) and return it."""
    rng = np.random.default_rng([seed, int(dom.code[1:]), index])
    folder = _domain_folder(out_dir, dom)
    item_id = f"{dom.code}_{index:04d}"
    if dom.bi_temporal:
        sample = dom.sample(rng, size, bool(label))
        refs = (folder / "before" / f"{item_id}_before.png",)
        save_image(sample.reference, refs[0])
    else:
        picks = sorted(int(i) for i in rng.choice(REFERENCE_POOL_SIZE, N_REFERENCES, replace=False))
        refs = tuple(_reference_path(out_dir, dom, i) for i in picks)
        sample = dom.sample(rng, size, bool(label))
    query = folder / "queries" / f"{item_id}.png"
    save_image(sample.image, query)
    mask_path = None
    if sample.mask is not None:
        mask_path = folder / "masks" / f"{item_id}_mask.png"
        save_image(sample.mask.astype(np.uint8) * 255, mask_path)
    return Item(item_id=item_id, query_path=query, ref_paths=refs, domain=dom.name, domain_code=dom.code,
                label=label, anomaly_type=sample.anomaly_type, source_dataset=SOURCE_DATASET,
                category=dom.category, split=split, mask_path=mask_path, card=dom.card,
                extra={"defect_family": DEFECT_FAMILIES.get(sample.anomaly_type or ""),
                       "defect_severity": sample.severity})


def generate_benchmark(out_dir: str | Path, seed: int = 0, *, n_test_per_domain: int = 24, n_calibration: int = 8,
                       n_dev: int = 8, size: int = 256, domains: Sequence[str] | None = None,
                       workers: int | None = None) -> Path:
    """Write the synthetic benchmark to ``out_dir`` and return the path of its ``manifest.json``.

    Per domain: ``n_calibration``, ``n_dev`` and ``n_test_per_domain`` items (about half of each
    anomalous), images of ``size`` x ``size`` px, a pool of :data:`REFERENCE_POOL_SIZE` normal
    reference images from which each item draws :data:`N_REFERENCES` (a bi-temporal item gets its
    own "before" image instead), and a uint8 PNG mask (255 = anomalous) per anomalous item.
    ``domains`` picks codes (``S1``) or names (``texture_surface``); each domain's images depend
    only on ``seed`` and the domain, so a subset reproduces the same files. ``workers`` threads
    render in parallel (default: one per CPU core, at most 8); the output does not depend on it.
    Existing files are overwritten; manifest paths are relative, so the folder can be moved.
    """
    if not isinstance(size, (int, np.integer)) or not 64 <= size <= 1024:
        raise ConfigError(f"size must be an integer from 64 to 1024 px, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    counts = {"calibration": n_calibration, "dev": n_dev, "test": n_test_per_domain}
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"the number of {split} items per domain must be a non-negative integer, got {n!r}")
    if n_test_per_domain < 2:
        raise ConfigError(f"n_test_per_domain must be at least 2 (one normal, one anomalous), got {n_test_per_domain}")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ConfigError(f"workers must be a positive integer or None, got {workers!r}")
    chosen = _choose_domains(domains)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seed, size = int(seed), int(size)
    reference_jobs = [(dom, i) for dom in chosen if not dom.bi_temporal for i in range(REFERENCE_POOL_SIZE)]
    item_jobs = [(dom, index, split, label) for dom in chosen
                 for index, (split, label) in enumerate(_split_plan(np.random.default_rng([seed, int(dom.code[1:])]),
                                                                    counts))]
    # OpenCV and NumPy release the GIL in their loops, so threads render and encode in parallel.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _write_reference(job[0], out, seed, job[1], size), reference_jobs))
        items = list(pool.map(lambda job: _write_item(job[0], out, seed, job[1], job[2], job[3], size), item_jobs))
    return write_manifest(items, out / "manifest.json")
