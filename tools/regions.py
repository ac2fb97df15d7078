"""Boxes on the query: a model's normalized bbox validated into a :class:`Region` (normalized and
pixel forms, with what was fixed), and conversions between the two."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .guard import ToolArgumentError

@dataclass(frozen=True)
class Region:
    """A validated bbox on the work-size query: normalized and pixel forms, plus what was fixed."""

    norm: tuple[float, float, float, float]
    """[x0, y0, x1, y1] in [0, 1] of the query's width and height."""
    px: tuple[int, int, int, int]
    """[x0, y0, x1, y1) in pixels of the work-size query (end exclusive)."""
    notes: tuple[str, ...] = ()
    whole: bool = False
    """True when no bbox was given and the region is the whole image."""

    def slices(self) -> tuple[slice, slice]:
        x0, y0, x1, y1 = self.px
        return slice(y0, y1), slice(x0, x1)

    def on(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The same normalized box in pixels of another image of ``shape`` (H, W, ...)."""
        return norm_to_px(self.norm, shape)


def norm_to_px(norm: Sequence[float], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    x0 = min(max(int(math.floor(norm[0] * w)), 0), w - 1)
    y0 = min(max(int(math.floor(norm[1] * h)), 0), h - 1)
    x1 = max(min(int(math.ceil(norm[2] * w)), w), x0 + 1)
    y1 = max(min(int(math.ceil(norm[3] * h)), h), y0 + 1)
    return x0, y0, x1, y1


def px_to_norm(px: Sequence[float], shape: tuple[int, ...]) -> list[float]:
    h, w = shape[:2]
    return [round(px[0] / w, 4), round(px[1] / h, 4), round(px[2] / w, 4), round(px[3] / h, 4)]


#: How every tool's schema describes its bbox argument.
BBOX_DESCRIPTION = ("region [x0, y0, x1, y1] as fractions in [0, 1] of the query's width and height "
                    "(x0 < x1, y0 < y1)")
BBOX_FORMAT = "bbox must be [x0, y0, x1, y1] normalized to [0, 1] on the query, with x0 < x1 and y0 < y1"


def resolve_bbox(value: Any, shape: tuple[int, ...], *, required: bool = False,
                 min_px: int = 8) -> Region:
    """Validate a model-given bbox against a query of ``shape`` (H, W, ...).

    ``None`` means the whole image (or an error when ``required``). Values slightly outside
    [0, 1] are clamped and noted; NaN, wrong length, reversed corners, pixel-looking values and
    far-out values raise :class:`ToolArgumentError` with a message the model can act on. A box
    narrower than ``min_px`` pixels is widened around its centre (noted).
    """
    h, w = shape[:2]
    if value is None:
        if required:
            raise ToolArgumentError(f"a bbox is required: {BBOX_FORMAT}, e.g. [0.25, 0.25, 0.5, 0.5]")
        return Region((0.0, 0.0, 1.0, 1.0), (0, 0, w, h), whole=True)
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 4:
        raise ToolArgumentError(f"{BBOX_FORMAT}; got {value!r}")
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ToolArgumentError(f"{BBOX_FORMAT}; got non-numbers {value!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise ToolArgumentError(f"{BBOX_FORMAT}; got {value!r} (NaN or infinite values)")
    if min(box) >= 0 and max(box) > 1.5:
        raise ToolArgumentError(
            f"{BBOX_FORMAT}; got {box}, which look like pixel coordinates: divide x by the "
            "image width and y by its height")
    if min(box) < -0.5 or max(box) > 1.5:
        raise ToolArgumentError(f"{BBOX_FORMAT}; got {box}, far outside [0, 1]")
    notes: list[str] = []
    clamped = [min(max(v, 0.0), 1.0) for v in box]
    if clamped != box:
        notes.append(f"bbox {_fmt_box(box)} was clamped to [0, 1]: {_fmt_box(clamped)}")
    x0, y0, x1, y1 = clamped
    if not (x0 < x1 and y0 < y1):
        raise ToolArgumentError(f"{BBOX_FORMAT}; got {_fmt_box(box)}"
                                + (" (after clamping to [0, 1] it is empty)" if clamped != box else ""))
    px = list(norm_to_px(clamped, shape))
    min_w, min_h = min(min_px, w), min(min_px, h)
    if px[2] - px[0] < min_w or px[3] - px[1] < min_h:
        before = (px[2] - px[0], px[3] - px[1])
        for lo, hi, size, limit in ((0, 2, min_w, w), (1, 3, min_h, h)):
            if px[hi] - px[lo] < size:
                centre = (px[lo] + px[hi]) // 2
                start = min(max(centre - size // 2, 0), limit - size)
                px[lo], px[hi] = start, start + size
        notes.append(f"bbox was {before[0]}x{before[1]} px on the {w}x{h} px work image; "
                     f"widened to {px[2] - px[0]}x{px[3] - px[1]} px")
        clamped = px_to_norm(px, shape)
    return Region(tuple(round(v, 4) for v in clamped), tuple(px), tuple(notes))


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in box) + "]"
