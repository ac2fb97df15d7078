"""The OpenCV decode of plain 8-bit RGB PNGs: Pillow's pixels, and every other PNG left to Pillow."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from anomalyclaw import imaging
from anomalyclaw.errors import ImageLoadError
from anomalyclaw.imaging import load_image


def _pillow(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return imaging._to_rgb_array(imaging._upright(im, im))


@pytest.fixture
def decodes(monkeypatch):
    """The calls that reached OpenCV's decoder."""
    seen = []
    real = cv2.imdecode

    def spy(buf, flags):
        seen.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(imaging.cv2, "imdecode", spy)
    return seen


def _rgb(seed: int = 0, size=(37, 53)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8), "RGB")


def test_plain_rgb_pngs_decode_through_opencv_to_pillows_pixels(tmp_path, decodes):
    for i, kwargs in enumerate([{}, {"compress_level": 0}, {"compress_level": 9}, {"optimize": True},
                                {"interlace": 1}]):  # Adam7 too
        path = tmp_path / f"plain{i}.png"
        _rgb(i).save(path, **kwargs)
        assert np.array_equal(load_image(path), _pillow(path)), kwargs
    assert len(decodes) == 5
    assert load_image(path, max_side=20).shape[:2] == (14, 20)  # reduced after the decode


def test_other_pngs_are_left_to_pillow(tmp_path, decodes):
    rgb = _rgb(1)
    cases = {"rgba": rgb.convert("RGBA"), "grey": rgb.convert("L"), "palette": rgb.convert("P"),
             "grey16": Image.fromarray(np.arange(37 * 53, dtype=np.uint16).reshape(37, 53) * 30)}
    for name, im in cases.items():
        im.save(tmp_path / f"{name}.png")
    rgb.save(tmp_path / "trns.png", transparency=(0, 0, 0))  # a transparent colour: composited on black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow turns it upright
    rgb.save(tmp_path / "rotated.png", exif=exif)
    for path in sorted(tmp_path.glob("*.png")):
        assert np.array_equal(load_image(path), _pillow(path)), path.name
    assert load_image(tmp_path / "rotated.png").shape[:2] == (53, 37)
    assert decodes == []


def test_a_corrupt_plain_png_is_reported_by_pillow(tmp_path, decodes):
    buf = io.BytesIO()
    _rgb(2, (64, 64)).save(buf, format="PNG", compress_level=1)
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 400] = bytes(390)  # the compressed pixels wrecked, chunk layout intact
    path = tmp_path / "wrecked.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="wrecked.png"):
        load_image(path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[:-200])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    assert len(decodes) == 1  # the wrecked one was tried; the truncated one has no IEND
