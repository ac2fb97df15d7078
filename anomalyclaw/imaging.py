"""The one image loader, and the encoders that turn arrays into PNG/JPEG bytes and data URLs.

Every image the project reads goes through :func:`load_image`, which turns whatever is on disk
(16-bit, greyscale, RGBA, CMYK, palette, EXIF-rotated, huge) into an ``H x W x 3`` uint8 RGB
array, or raises :class:`ImageLoadError` naming the file and the reason.
"""
from __future__ import annotations

import base64
import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

#: Refuse to decode images larger than this many pixels (a decompression-bomb guard); JPEGs
#: above it are decoded at a reduced scale instead. Override with ANOMALYCLAW_MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 80_000_000
#: Images whose shorter side is below this carry no usable evidence.
MIN_SIDE = 8


def max_image_pixels() -> int:
    raw = os.environ.get("ANOMALYCLAW_MAX_IMAGE_PIXELS")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        return max(1, int(raw))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth (medical, scientific): stretch the image's own range to 8 bits.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        grey = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        # Transparent pixels can hold any colour: composite on black so they are defined.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def load_image(path: str | os.PathLike, *, max_side: int | None = None) -> np.ndarray:
    """Load ``path`` as an RGB uint8 array of shape (H, W, 3), EXIF orientation applied.

    ``max_side`` downscales (area interpolation) so that the longer side is at most that.
    Raises :class:`ImageLoadError` for a missing, empty, truncated, non-image or too-large file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(str(p), "file does not exist")
    if not p.is_file():
        raise ImageLoadError(str(p), "not a regular file")
    if p.stat().st_size == 0:
        raise ImageLoadError(str(p), "file is empty (0 bytes)")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > limit:
                    if im.format == "JPEG":
                        # Decode straight at a reduced scale: memory stays bounded.
                        scale = (limit / (w * h)) ** 0.5
                        im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
                        if im.size[0] * im.size[1] > limit:
                            raise ImageLoadError(str(p), f"image is {w}x{h} px, above the "
                                                 f"{limit:,} px limit even at 1/8 scale")
                    else:
                        raise ImageLoadError(
                            str(p), f"image is {w}x{h} px ({w * h / 1e6:.0f} MP), above the "
                            f"{limit / 1e6:.0f} MP decompression-bomb limit; downscale it or "
                            "raise ANOMALYCLAW_MAX_IMAGE_PIXELS")
                im.load()
                im = ImageOps.exif_transpose(im)
                arr = _to_rgb_array(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(str(p), f"decompression-bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(str(p), "not an image file (content is not a known image format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(str(p), f"truncated or corrupt image data ({exc})") from None
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageLoadError(str(p), f"image is {w}x{h} px, smaller than {MIN_SIDE} px on a side")
    if max_side is not None:
        arr = resize_longest(arr, max_side)
    return arr


def load_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as a boolean (H, W) array, resized (nearest) to ``shape`` if given."""
    grey = load_image(path)[:, :, 0]
    if shape is not None and grey.shape != tuple(shape):
        grey = cv2.resize(grey, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return grey > 127


def resize_longest(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is at most ``max_side``; never upscale."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def resize_to(img: np.ndarray, shape: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize to exactly ``shape`` = (H, W)."""
    if img.shape[:2] == tuple(shape):
        return img
    interp = cv2.INTER_NEAREST if nearest else (
        cv2.INTER_AREA if img.shape[0] * img.shape[1] > shape[0] * shape[1] else cv2.INTER_LINEAR)
    return cv2.resize(img, (shape[1], shape[0]), interpolation=interp)


def encode_image(img: np.ndarray, fmt: str = "PNG", *, quality: int = 88,
                 max_side: int | None = None) -> bytes:
    """Encode an RGB (or greyscale) uint8 array as PNG or JPEG bytes."""
    if max_side is not None:
        img = resize_longest(img, max_side)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    fmt = fmt.upper()
    if fmt in ("JPG", "JPEG"):
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == "PNG":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use PNG or JPEG")
    if not ok:
        raise ValueError(f"could not encode a {img.shape} image as {fmt}")
    return buf.tobytes()


def mime_of(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def to_data_url(data: bytes) -> str:
    """A ``data:`` URL for encoded image bytes, as OpenAI-compatible endpoints take images."""
    return f"data:{mime_of(data)};base64,{base64.b64encode(data).decode('ascii')}"


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes back to an RGB array (used by the offline policy and by reports)."""
    with Image.open(io.BytesIO(data)) as im:
        return _to_rgb_array(im)


def save_image(img: np.ndarray, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if p.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    p.write_bytes(encode_image(img, fmt))
