"""Images as the VLM receives them: downscaled, encoded once, reused across turns and items."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from anomalyclaw.imaging import encode_image, mime_of, to_data_url


class ImageEncoder:
    """Data URLs for images, cached by key (a reference shared by many items is encoded once).

    ``hits`` and ``misses`` count cache use; the cache holds at most ``capacity`` URLs.
    """

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._cache: OrderedDict[Any, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def data_url(self, key: Any, image: Callable[[], np.ndarray] | np.ndarray, *, max_side: int,
                 fmt: str = "JPEG") -> str:
        """The data URL of ``image`` (an array or a callable giving one) at ``max_side``."""
        full_key = (key, max_side, fmt.upper())
        with self._lock:
            if full_key in self._cache:
                self._cache.move_to_end(full_key)
                self.hits += 1
                return self._cache[full_key]
        pixels = image() if callable(image) else image
        url = to_data_url(encode_image(pixels, fmt, max_side=max_side))
        with self._lock:
            self.misses += 1
            self._cache[full_key] = url
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return url

    @staticmethod
    def bytes_url(data: bytes) -> str:
        """A data URL for bytes a tool already encoded (PNG or JPEG)."""
        mime_of(data)
        return to_data_url(data)


def image_block(url: str) -> dict[str, Any]:
    """An OpenAI-format image content block."""
    return {"type": "image_url", "image_url": {"url": url}}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}
