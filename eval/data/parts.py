"""A small MVTec-style folder drawn from scratch, to check things on data the synthetic
benchmark never saw.

The synthetic benchmark (``eval/data/synth``) is built from scikit-image's gravel, grass,
brick, coins, retina, immunohistochemistry and Shepp-Logan pictures. This folder uses none of
them: two categories are drawn procedurally with OpenCV and one is cut from scikit-image's
``moon`` picture, with ``camera`` as the foreign material. It is written in the MVTec layout
(``<category>/train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/*_mask.png``)
so that ``anomalyclaw import-folder`` reads it like any user's data:

* ``washer``: a machined ring with six bolt holes on a mat, small shifts and turns between
  shots (an aligned object); defects ``missing_hole``, ``scratch``, ``chip``;
* ``label``: a printed label (ruled lines of "text", a barcode, a logo disc), aligned;
  defects ``smudge``, ``missing_print``, ``misprint`` (the logo moved);
* ``tile`` (an MVTec texture name, so it is imported as a texture): crops of the lunar
  surface; defects ``crack``, ``stain``, ``foreign`` (a patch of another picture).

Everything follows from ``seed``; the same call writes the same bytes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from skimage import data

CATEGORIES = ("washer", "label", "tile")
DEFECTS = {"washer": ("missing_hole", "scratch", "chip"), "label": ("smudge", "missing_print", "misprint"),
           "tile": ("crack", "stain", "foreign")}

Drawer = Callable[[np.random.Generator, int, str | None], tuple[np.ndarray, np.ndarray]]


def _noise(rng: np.random.Generator, image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    return np.clip(image.astype(np.float32) + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def _mat(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark fabric mat: smooth random shading with fine grain (BGR uint8)."""
    coarse = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 0.8)
    grey = 55 + 6 * coarse + 5 * grain
    return np.dstack([grey * 0.95, grey, grey * 1.08]).clip(0, 255).astype(np.uint8)


def _washer(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    img = _mat(rng, size)
    mask = np.zeros((size, size), np.uint8)
    c = np.array([size / 2, size / 2]) + rng.uniform(-0.025, 0.025, 2) * size
    theta = rng.uniform(-12, 12) * np.pi / 180
    r_out, r_in, r_hole, r_bolt = 0.38 * size, 0.16 * size, 0.035 * size, 0.27 * size
    metal = np.full((size, size), 0, np.uint8)
    cv2.circle(metal, tuple(int(v) for v in c), int(r_out), 255, -1, cv2.LINE_AA)
    cv2.circle(metal, tuple(int(v) for v in c), int(r_in), 0, -1, cv2.LINE_AA)
    holes = [c + r_bolt * np.array([np.cos(theta + k * np.pi / 3), np.sin(theta + k * np.pi / 3)]) for k in range(6)]
    missing = int(rng.integers(6)) if defect == "missing_hole" else -1
    for k, h in enumerate(holes):
        if k != missing:
            cv2.circle(metal, tuple(int(v) for v in h), int(r_hole), 0, -1, cv2.LINE_AA)
    if defect == "missing_hole":
        cv2.circle(mask, tuple(int(v) for v in holes[missing]), int(r_hole * 1.6), 255, -1)
    if defect == "chip":
        a = rng.uniform(0, 2 * np.pi)
        p = c + r_out * np.array([np.cos(a), np.sin(a)])
        radius = int(rng.uniform(0.03, 0.045) * size)
        cv2.circle(metal, tuple(int(v) for v in p), radius, 0, -1, cv2.LINE_AA)
        cv2.circle(mask, tuple(int(v) for v in p), radius, 255, -1)
        mask &= cv2.dilate((metal == 0).astype(np.uint8) * 255, np.ones((5, 5), np.uint8)) & \
            cv2.circle(np.zeros_like(mask), tuple(int(v) for v in c), int(r_out) + 3, 255, -1)
    alpha = cv2.GaussianBlur(metal.astype(np.float32) / 255, (0, 0), 0.7)[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = rng.uniform(-1, 1, 2)
    shade = rng.uniform(160, 190) + 35 * (light[0] * (xx - c[0]) + light[1] * (yy - c[1])) / size \
        + rng.normal(0, 2, (size, size))
    steel = np.dstack([shade, shade * 1.01, shade * 1.03])
    img = (alpha * steel + (1 - alpha) * img).clip(0, 255)
    if defect == "scratch":
        a = rng.uniform(0, np.pi)
        mid = c + rng.uniform(0.2, 0.32) * size * np.array([np.cos(a + 1.2), np.sin(a + 1.2)])
        d = rng.uniform(0.05, 0.08) * size * np.array([np.cos(a), np.sin(a)])
        p0, p1 = tuple(int(v) for v in mid - d), tuple(int(v) for v in mid + d)
        line = np.zeros((size, size), np.uint8)
        cv2.line(line, p0, p1, 255, 1, cv2.LINE_AA)
        line &= (metal > 127).astype(np.uint8) * 255
        img[line > 0] = (img[line > 0] * 0.6).astype(np.float32)
        mask |= cv2.dilate(line, np.ones((5, 5), np.uint8))
    return _noise(rng, img), mask


def _label_print(size: int) -> np.ndarray:
    """The label's print, fixed for every item (grey uint8 ``size x size``, 0 = ink)."""
    art = np.full((size, size), 255, np.uint8)
    cv2.rectangle(art, (int(0.08 * size), int(0.1 * size)), (int(0.92 * size), int(0.9 * size)), 0, 2)
    text = data.text()  # scikit-image's printed-text picture, not used by the synthetic benchmark
    strip = cv2.resize(text[20:150, 10:430], (int(0.62 * size), int(0.34 * size)), interpolation=cv2.INTER_AREA)
    strip = np.where(strip < 110, 0, 255).astype(np.uint8)
    x0, y0 = int(0.3 * size), int(0.16 * size)
    art[y0:y0 + strip.shape[0], x0:x0 + strip.shape[1]] = strip
    for k in range(3):  # ruled lines of small print
        y = int((0.58 + 0.07 * k) * size)
        cv2.line(art, (int(0.14 * size), y), (int((0.86 - 0.12 * k) * size), y), 0, 2)
    bars = np.random.default_rng(7).integers(1, 4, 40)  # a fixed barcode
    x = int(0.14 * size)
    for k, w in enumerate(bars):
        if x + w > 0.86 * size:
            break
        if k % 2 == 0:
            cv2.rectangle(art, (x, int(0.8 * size)), (x + int(w) - 1, int(0.86 * size)), 0, -1)
        x += int(w)
    return art


def _label(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    art = _label_print(size).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    logo_c = (int(0.19 * size), int(0.27 * size))
    if defect == "misprint":
        moved = (logo_c[0] + int(rng.choice([-1, 1]) * rng.uniform(0.02, 0.04) * size),
                 logo_c[1] + int(rng.uniform(0.02, 0.05) * size))
        cv2.circle(art, moved, int(0.07 * size), 0, -1, cv2.LINE_AA)
        cv2.circle(mask, logo_c, int(0.08 * size), 255, -1)
        cv2.circle(mask, moved, int(0.08 * size), 255, -1)
    else:
        cv2.circle(art, logo_c, int(0.07 * size), 0, -1, cv2.LINE_AA)
    if defect == "missing_print":
        y = int((0.58 + 0.07 * int(rng.integers(3))) * size)
        x0 = int(rng.uniform(0.2, 0.5) * size)
        x1 = x0 + int(rng.uniform(0.06, 0.12) * size)
        art[y - 4:y + 5, x0:x1] = 255
        mask[y - 6:y + 7, x0:x1] = 255
    if defect == "smudge":
        p = (rng.uniform(0.25, 0.75) * size, rng.uniform(0.3, 0.7) * size)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        blob = np.exp(-(((xx - p[0]) / (0.04 * size)) ** 2 + ((yy - p[1]) / (0.03 * size)) ** 2))
        art = art * (1 - rng.uniform(0.2, 0.35) * blob)
        mask[blob > 0.25] = 255
    # The label sits a little askew and shifted on the scanner, under uneven light.
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-2.5, 2.5), 1.0)
    turn[:, 2] += rng.uniform(-0.02, 0.02, 2) * size
    art = cv2.warpAffine(art, turn, (size, size), borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(mask, turn, (size, size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    slope = rng.uniform(-0.12, 0.12, 2)
    light = rng.uniform(0.88, 1.02) * (1 + slope[0] * xx + slope[1] * yy)
    img = np.dstack([art * 0.93, art * 0.97, art]) * light[..., None]
    return _noise(rng, img, 2.5), mask


def _tile(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    moon = data.moon().astype(np.float32)  # scikit-image's lunar surface, not used by the synthetic benchmark
    side = int(rng.uniform(0.45, 0.6) * moon.shape[0])
    y0, x0 = rng.integers(0, moon.shape[0] - side), rng.integers(0, moon.shape[1] - side)
    grey = cv2.resize(moon[y0:y0 + side, x0:x0 + side], (size, size), interpolation=cv2.INTER_AREA)
    grey = (grey - grey.mean()) / (grey.std() + 1e-6) * 22 + 128
    mask = np.zeros((size, size), np.uint8)
    if defect == "crack":
        pts = [np.array([rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.4) * size])]
        for _ in range(6):
            pts.append(pts[-1] + np.array([rng.normal(0, 0.03), 0.06]) * size)
        line = np.zeros((size, size), np.uint8)
        cv2.polylines(line, [np.int32(pts)], False, 255, 2, cv2.LINE_AA)
        grey[line > 0] *= 0.35
        mask = cv2.dilate(line, np.ones((5, 5), np.uint8))
    elif defect == "stain":
        p = rng.uniform(0.25, 0.75, 2) * size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        blob = np.exp(-(((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (0.07 * size) ** 2))
        grey = grey * (1 - rng.uniform(0.2, 0.35) * blob)
        mask[blob > 0.3] = 255
    elif defect == "foreign":
        cam = data.camera().astype(np.float32)
        k = int(0.16 * size)
        py, px = rng.integers(0, cam.shape[0] - 2 * k), rng.integers(0, cam.shape[1] - 2 * k)
        patch = cv2.resize(cam[py:py + 2 * k, px:px + 2 * k], (k, k), interpolation=cv2.INTER_AREA)
        ty, tx = rng.integers(k, size - 2 * k, 2)
        grey[ty:ty + k, tx:tx + k] = patch
        mask[ty:ty + k, tx:tx + k] = 255
    img = np.dstack([grey * 0.98, grey, grey * 1.02])
    return _noise(rng, img, 2.0), mask


DRAWERS: dict[str, Drawer] = {"washer": _washer, "label": _label, "tile": _tile}


def write_parts_folder(root: str | os.PathLike, *, seed: int = 0, n_train: int = 12, n_test_good: int = 10,
                       n_per_defect: int = 4, size: int = 256,
                       categories: tuple[str, ...] = CATEGORIES) -> Path:
    """Write the folder under ``root`` (MVTec layout) and return ``root``.

    Per category: ``n_train`` normal references, ``n_test_good`` normal and ``n_per_defect``
    anomalous test images of each defect, with their masks.
    """
    unknown = set(categories) - set(DRAWERS)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    if size < 64:
        raise ValueError(f"size must be at least 64 px, got {size}")
    root = Path(root)
    for c_index, category in enumerate(categories):
        draw = DRAWERS[category]
        rng = np.random.default_rng([seed, c_index])
        plan = [("train", "good", n_train), ("test", "good", n_test_good)] + \
            [("test", defect, n_per_defect) for defect in DEFECTS[category]]
        for split, kind, n in plan:
            folder = root / category / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                image, mask = draw(rng, size, None if kind == "good" else kind)
                name = f"{k:03d}.png"
                cv2.imwrite(str(folder / name), image)
                if kind != "good":
                    gt = root / category / "ground_truth" / kind
                    gt.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(gt / f"{k:03d}_mask.png"), mask)
    return root
