"""The one image loader, and the encoders that turn arrays into PNG/JPEG bytes and data URLs.

Every image the project reads goes through :func:`load_image`, which turns whatever is on disk
(16-bit, greyscale, RGBA, CMYK, palette, EXIF-rotated, float with NaN, the first frame of an
animated GIF/WebP or a multi-page TIFF, huge) into an ``H x W x 3`` uint8 RGB array, or raises
:class:`ImageLoadError` naming the file and the reason.

Decoding memory is bounded per process: a decode reserves its pixels' bytes from one
:class:`DecodeBudget` first (ANOMALYCLAW_DECODE_BUDGET_MB, default 1024), so many large images
in flight wait for each other instead of all decoding at once; and a large image is reduced right
after decoding, before any copy is made.
"""
from __future__ import annotations

import base64
import io
import os
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError

#: Refuse to decode images larger than this many pixels (a decompression-bomb guard); JPEGs
#: above it are decoded at a reduced scale instead. Override with ANOMALYCLAW_MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 80_000_000
#: Images whose shorter side is below this carry no usable evidence.
MIN_SIDE = 8
#: Longest side over shortest side beyond which an image is refused: at the tools' working size
#: (512 px) a 100000 x 10 strip would be one pixel high.
MAX_ASPECT = 64
#: Bytes of decoded pixels in flight across all threads, unless ANOMALYCLAW_DECODE_BUDGET_MB says.
DEFAULT_DECODE_BUDGET_MB = 1024
#: Pillow modes that ``Image.reduce`` handles directly.
_REDUCIBLE = frozenset({"L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "RGBX"})
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class DecodeBudget:
    """The bytes of decoded pixels in flight in this process, across threads.

    :meth:`reserve` waits until the bytes fit beside what is in flight; an image larger than the
    whole budget decodes alone. Peak decode memory is then about the budget plus one image,
    whatever the concurrency (12 images of 72 MP at concurrency 32 would otherwise decode at
    once).
    """

    def __init__(self, capacity_bytes: int | None = None):
        self._capacity = capacity_bytes
        self._cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        self.waits = 0

    @property
    def capacity(self) -> int:
        if self._capacity is not None:
            return self._capacity
        raw = os.environ.get("ANOMALYCLAW_DECODE_BUDGET_MB")
        try:
            mb = float(raw) if raw else DEFAULT_DECODE_BUDGET_MB
        except ValueError:
            mb = DEFAULT_DECODE_BUDGET_MB
        return max(1, int(mb * 2**20))

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, int(nbytes))
        with self._cond:
            if self.in_flight and self.in_flight + nbytes > self.capacity:
                self.waits += 1
                while self.in_flight and self.in_flight + nbytes > self.capacity:
                    self._cond.wait()
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= nbytes
                self._cond.notify_all()


#: The process's one decode budget.
DECODE_BUDGET = DecodeBudget()


def _decoded_bytes(im: Image.Image) -> int:
    """What decoding ``im`` costs at its (drafted) size, with the array copy made from it."""
    bands = len(im.getbands())
    per_sample = 4 if im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1
    w, h = im.size
    return w * h * (bands * per_sample + 3)  # the decoded image plus its RGB array


def _png_without_text(path: Path) -> io.BytesIO:
    """The PNG at ``path`` with its text chunks (tEXt, zTXt, iTXt) left out: metadata that
    Pillow refuses to decompress (above MAX_TEXT_CHUNK) must not cost the pixels."""
    out = io.BytesIO()
    with open(path, "rb") as fh:
        signature = fh.read(8)
        if signature != b"\x89PNG\r\n\x1a\n":
            raise ValueError("not a PNG")
        out.write(signature)
        while True:
            head = fh.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                fh.seek(length + 4, os.SEEK_CUR)
                continue
            out.write(head + fh.read(length + 4))
            if kind == b"IEND":
                break
    out.seek(0)
    return out


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
        # High bit depth (medical, scientific): stretch the image's own finite range to 8 bits.
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        grey = np.clip(np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        # Transparent pixels can hold any colour: composite on black so they are defined.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _upright(original: Image.Image, im: Image.Image) -> Image.Image:
    """``im`` (``original`` or its reduction) turned as ``original``'s EXIF orientation says; a
    malformed EXIF block is ignored (the pixels are fine). No copy when there is nothing to do."""
    try:
        orientation = original.getexif().get(0x0112, 1)
    except Exception:  # PIL raises several types for broken EXIF: the orientation is optional
        return im
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(method) if method is not None else im


def _draft_size(w: int, h: int, longest: float) -> tuple[int, int]:
    """The (w, h) to ask a JPEG decoder for so that the longer side is at least ``longest``."""
    scale = min(1.0, longest / max(w, h))
    return max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))


def load_image(path: str | os.PathLike, *, max_side: int | None = None) -> np.ndarray:
    """Load ``path`` as an RGB uint8 array of shape (H, W, 3), EXIF orientation applied.

    ``max_side`` downscales (area interpolation) so that the longer side is at most that; a JPEG
    is then decoded at a reduced scale straight away (a 6000 x 4000 photo decodes in a tenth of
    the time), any other format is reduced right after decoding. Images above
    :func:`max_image_pixels` are refused, except JPEGs, which are decoded at a scale under the
    limit. Each decode first reserves its bytes from :data:`DECODE_BUDGET`. Raises
    :class:`ImageLoadError` for a missing, empty, truncated, non-image, too-small, too-large or
    too-elongated file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(str(p), "file does not exist")
    if not p.is_file():
        raise ImageLoadError(str(p), "not a regular file")
    if p.stat().st_size == 0:
        raise ImageLoadError(str(p), "file is empty (0 bytes)")
    try:
        arr = _decode(p, p, max_side)
    except ValueError as exc:
        if "MAX_TEXT_CHUNK" not in str(exc) and "text chunks" not in str(exc):
            raise ImageLoadError(str(p), f"truncated or corrupt image data ({exc})") from None
        try:  # metadata too large to decompress: the pixels without it
            arr = _decode(p, _png_without_text(p), max_side)
        except ValueError as again:
            raise ImageLoadError(str(p), f"truncated or corrupt image data ({again})") from None
    if max_side is not None:
        arr = resize_longest(arr, max_side)
    return arr


def _decode(p: Path, source: Path | io.BytesIO, max_side: int | None) -> np.ndarray:
    """:func:`load_image`'s decoding, from ``source`` (the file, or its bytes)."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                w, h = opened.size
                if min(w, h) < MIN_SIDE:
                    raise ImageLoadError(str(p), f"image is {w}x{h} px, smaller than {MIN_SIDE} px on a side")
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise ImageLoadError(str(p), f"image is {w}x{h} px: its long side is more than {MAX_ASPECT} times "
                                         "its short side, too thin for any tool at its working size; crop it into tiles")
                if opened.format == "JPEG" and (w * h > limit or (max_side is not None and max(w, h) > max_side)):
                    # Decode at a reduced scale (1/2, 1/4 or 1/8): memory and time stay bounded.
                    # The decoder rounds up to less than twice the size asked for, so ask for
                    # half the longest side the pixel limit allows.
                    longest = min(max_side or max(w, h), 0.5 * max(w, h) * (limit / (w * h)) ** 0.5)
                    opened.draft("RGB", _draft_size(w, h, longest))
                    if opened.size[0] * opened.size[1] > limit:
                        raise ImageLoadError(str(p), f"image is {w}x{h} px, above the {limit:,} px "
                                             "decompression-bomb limit even at 1/8 scale; downscale it "
                                             "or raise ANOMALYCLAW_MAX_IMAGE_PIXELS")
                elif w * h > limit:
                    raise ImageLoadError(
                        str(p), f"image is {w}x{h} px ({w * h / 1e6:.0f} MP), above the "
                        f"{limit / 1e6:.0f} MP decompression-bomb limit; downscale it or "
                        "raise ANOMALYCLAW_MAX_IMAGE_PIXELS")
                with DECODE_BUDGET.reserve(_decoded_bytes(opened)):
                    if opened.format == "PNG" and isinstance(source, Path) and _reduced(opened, max_side) is opened:
                        plain = _plain_png_rgb(source)
                        if plain is not None:
                            return plain
                    opened.load()  # the first frame of an animation or page of a TIFF
                    mode = opened.mode
                    im = _reduced(opened, max_side)
                    im = _upright(opened, im)
                    try:
                        return _to_rgb_array(im)
                    except ValueError as exc:
                        raise ImageLoadError(str(p), f"unsupported colour mode {mode!r} ({exc}); save it as "
                                             "RGB or greyscale PNG/JPEG") from None
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(str(p), f"above the decompression-bomb limit ({exc}); downscale the image") from None
    except UnidentifiedImageError:
        raise ImageLoadError(str(p), "not an image file (content is not a known image format)") from None
    except (OSError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise ImageLoadError(str(p), f"truncated or corrupt image data ({exc})") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plain_png_rgb(path: Path) -> np.ndarray | None:
    """An 8-bit RGB PNG without transparency or EXIF chunks decoded by OpenCV, or None for any
    other PNG (and for one OpenCV cannot decode: Pillow then decodes it, or says what is wrong).

    For these files, the common case of inspection data, OpenCV's decoder gives Pillow's pixels
    for ~3/4 of the CPU (in a worker thread on the 512 px synthetic images: 4.7 against 6.2 ms);
    the chunk walk that decides it reads only the chunks' 8-byte headers. Transparency (tRNS)
    would be composited on black and an EXIF orientation (eXIf) applied by the Pillow path,
    and other bit depths and colour types are converted by it, so those go there. A file whose
    chunks are intact but whose pixels are not makes libpng print one line on stderr before
    Pillow raises the error that names it."""
    data = path.read_bytes()
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 29 or data[24] != 8 or data[25] != 2:
        return None
    pos = 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        if kind in (b"tRNS", b"eXIf"):
            return None
        if kind == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    else:
        return None  # no IEND: truncated, which Pillow reports
    # libpng hands the rows over in RGB order (no channel swap after, nor one inside libpng).
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3:
        return None
    return rgb


def _reduced(im: Image.Image, max_side: int | None) -> Image.Image:
    """``im`` box-reduced by the largest whole factor that keeps its longer side at least
    ``max_side`` (the final area resize does the rest), so no full-size copy is ever made."""
    if max_side is None or im.mode not in _REDUCIBLE:
        return im
    factor = max(im.size) // max_side
    return im.reduce(factor) if factor >= 2 else im


def load_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as a boolean (H, W) array, resized (nearest) to ``shape`` if given."""
    grey = load_image(path)[:, :, 0]
    if shape is not None and grey.shape != tuple(shape):
        grey = cv2.resize(grey, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return grey > 127


def finite_or_zero(values: np.ndarray) -> np.ndarray:
    """A float32 copy of ``values`` with NaN and infinities as 0: ``np.nan_to_num(..., nan=0,
    posinf=0, neginf=0)``'s numbers, where the usual all-finite map costs one ``isfinite`` pass
    beside the copy (a fifth of ``nan_to_num``'s time on a 256 px map, which builds its three
    masks whatever it finds)."""
    out = np.array(values, dtype=np.float32)
    if not np.isfinite(out).all():
        out[~np.isfinite(out)] = 0.0
    return out


def _longest_size(img: np.ndarray, max_side: int) -> tuple[int, int] | None:
    """(W, H) with the longer side at ``max_side``, or None when ``img`` is no larger already."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return None
    s = max_side / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def resize_longest(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longer side is at most ``max_side``; never upscale."""
    size = _longest_size(img, max_side)
    return img if size is None else cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def shrink_for_view(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``img`` downscaled to ``size`` = (W, H) for viewing (panels, captions; never the pixels a
    tool or expert measures): a box average by the whole factor first, on the image cut to a
    multiple of it (fewer than that many pixels off its bottom and right edges), then bilinear
    for the rest (< 2x). OpenCV's area resize is fast for whole factors and many times slower
    for others: a 512 px view to 150-384 px costs a half to a quarter of one area resize."""
    h, w = img.shape[:2]
    k = min(h // max(1, size[1]), w // max(1, size[0]))
    if k >= 2:
        hk, wk = h // k, w // k
        img = cv2.resize(img[:hk * k, :wk * k], (wk, hk), interpolation=cv2.INTER_AREA)
    if (img.shape[1], img.shape[0]) != tuple(size):
        img = cv2.resize(img, tuple(size), interpolation=cv2.INTER_LINEAR)
    return img


def view_longest(img: np.ndarray, max_side: int) -> np.ndarray:
    """:func:`shrink_for_view` to a longer side of at most ``max_side``; never upscales."""
    size = _longest_size(img, max_side)
    return img if size is None else shrink_for_view(img, size)


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
