"""S2, a coin tray: exactly 12 coins in 3 rows of 4 (counting, layout)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

from .base import Sample
from .raster import (
    _INDUSTRIAL_CAMERA,
    _acquisition,
    _dilate,
    _finish,
    _grey3,
    _grey_source,
    _lerp,
    _seed_defect,
    _smooth_field,
)


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
