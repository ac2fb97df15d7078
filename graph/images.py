"""Images as the VLM receives them: downscaled, encoded once, reused across turns and items."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from anomalyclaw.cache import LRUCache
from anomalyclaw.imaging import encode_image, to_data_url


class ImageEncoder:
    """Data URLs for images, cached by key (a reference shared by many items is encoded once).

    ``capacity`` bounds the URLs kept (least recently used out); ``hits`` and ``misses`` count
    cache use.
    """

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._cache: LRUCache[Any, str] = LRUCache("vlm.encoded_images", max_items=capacity)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def data_url(self, key: Any, image: Callable[[], np.ndarray] | np.ndarray, *, max_side: int,
                 fmt: str = "JPEG") -> str:
        """The data URL of ``image`` (an array or a callable giving one) at ``max_side``."""
        def encode() -> str:
            pixels = image() if callable(image) else image
            return to_data_url(encode_image(pixels, fmt, max_side=max_side))

        return self._cache.get_or_compute((key, max_side, fmt.upper()), encode)


def image_block(url: str) -> dict[str, Any]:
    """An OpenAI-format image content block."""
    return {"type": "image_url", "image_url": {"url": url}}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}
