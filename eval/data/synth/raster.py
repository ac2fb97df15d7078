"""Raster helpers the domains share: scikit-image sources, random fields, geometry, acquisition
(light, colour, focus, sensor noise) and drawing primitives (alpha maps), and seeding a defect."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np
from skimage import data

from .base import Sample


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
