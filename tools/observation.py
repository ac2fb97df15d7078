"""What a tool returns: the :class:`Observation` (text for the VLM, images, numbers, an evidence
mask), and the helpers every tool uses to build one (evidence ramps, image payloads, masks,
notes, text bounds)."""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from anomalyclaw.imaging import encode_image, view_longest

#: Longest side of any image a tool returns, in pixels.
MAX_IMAGE_SIDE = 768
#: Observation text is cut to this many characters (the VLM reads it every turn).
MAX_TEXT_CHARS = 1200
#: Strongest tint of the heat overlays tools return (``experts.maps.overlay_heatmap(...,
#: proportional=True)``): strong enough to read at a glance, weak enough to see the pixels under it.
TOOL_OVERLAY_ALPHA = 0.6
#: Longest side of an evidence mask, in pixels: 128 keeps a region of 0.05% of the image (the
#: smallest a tool reports) at about 8 px, and a mostly empty mask PNG at a few hundred bytes.
MASK_SIDE = 128


@dataclass
class ObservationImage:
    """One image a tool returns: encoded bytes (PNG or JPEG, longest side <= 768 px)."""

    name: str
    data: bytes
    caption: str


@dataclass
class EvidenceMask:
    """Where a tool found its evidence, per pixel: a uint8 greyscale PNG (longest side at most
    :data:`MASK_SIDE`) whose value / 255 is the tool's own evidence ramp applied to each pixel
    (``ramp(excess, lo, hi)``, the same ramp that makes its scalar ``evidence``): 0 = no more
    than normal variation (or outside what the tool looked at), 1 = full evidence. Plain bytes,
    so graph state and checkpoints hold it as they are."""

    png: bytes
    shape: tuple[int, int]
    """(H, W) of the PNG."""

    def to_state(self) -> dict[str, Any]:
        return {"png": self.png, "shape": [int(self.shape[0]), int(self.shape[1])]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "EvidenceMask | None":
        if not isinstance(state, dict) or not isinstance(state.get("png"), (bytes, bytearray)):
            return None
        shape = state.get("shape") or (0, 0)
        return cls(bytes(state["png"]), (int(shape[0]), int(shape[1])))


@dataclass
class Observation:
    """What one tool call found: text for the VLM, images, and numbers for a rule-based policy.

    ``data["evidence"]`` (float in [0, 1], when the tool measured anything) is how strongly the
    observation supports "anomalous in the given bbox (or the whole image)", calibrated against
    the references' own variation so that normal items get low values; ``data["bbox"]`` is the
    main finding's normalized ``[x0, y0, x1, y1]`` when there is one.
    """

    tool: str
    text: str = ""
    images: list[ObservationImage] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    applicable: bool = True
    error: str | None = None
    elapsed_s: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)
    mask: EvidenceMask | None = None
    """Where the evidence is, per pixel, for the tools that segment (``segment_anomaly``,
    ``image_diff``, ``change_heatmap_viz``, ``rotate_align``); the agent's anomaly map merges it."""

    def to_json(self, with_images: bool = False) -> dict[str, Any]:
        """JSON-serialisable form; images as captions only unless ``with_images`` (base64); the
        mask as its shape and size only (``mask_b64`` with ``with_images``)."""
        out = {"tool": self.tool, "text": self.text, "data": jsonable(self.data), "ok": self.ok,
               "applicable": self.applicable, "error": self.error,
               "elapsed_s": round(self.elapsed_s, 4), "args": jsonable(self.args),
               "images": [{"name": im.name, "caption": im.caption, "bytes": len(im.data)}
                          for im in self.images],
               "mask": None if self.mask is None else {"shape": list(self.mask.shape), "bytes": len(self.mask.png)}}
        if with_images:
            for entry, im in zip(out["images"], self.images):
                entry["data_b64"] = base64.b64encode(im.data).decode("ascii")
            if self.mask is not None:
                out["mask"]["mask_b64"] = base64.b64encode(self.mask.png).decode("ascii")
        return out

    def to_state(self) -> dict[str, Any]:
        """The observation as plain data for graph state and checkpoints: :meth:`to_json` with
        each image's bytes under ``data`` and the mask's PNG under ``mask.png`` (msgpack carries
        bytes as they are)."""
        out = self.to_json()
        for entry, im in zip(out["images"], self.images):
            entry["data"] = im.data
        out["mask"] = None if self.mask is None else self.mask.to_state()
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Observation":
        """The inverse of :meth:`to_state` (images without bytes come back empty)."""
        images = [ObservationImage(im["name"], im.get("data") or b"", im.get("caption", ""))
                  for im in state.get("images", [])]
        return cls(tool=state["tool"], text=state.get("text", ""), images=images, data=dict(state.get("data") or {}),
                   ok=state.get("ok", True), applicable=state.get("applicable", True), error=state.get("error"),
                   elapsed_s=state.get("elapsed_s", 0.0), args=dict(state.get("args") or {}),
                   mask=EvidenceMask.from_state(state.get("mask")))

    @classmethod
    def rejected(cls, tool: str, why: str, *, args: dict[str, Any] | None = None,
                 applicable: bool = True) -> "Observation":
        """A call that was not run (unknown tool, not applicable, bad arguments): ``why`` says
        what to do instead."""
        return cls(tool=tool, text=f"No tool was run: {why}", ok=False, applicable=applicable, error=why,
                   args=dict(args or {}), data={"evidence": None, "found": False})

    @classmethod
    def failure(cls, tool: str, error: str, *, args: dict[str, Any] | None = None) -> "Observation":
        return cls(tool=tool, text=f"{tool} failed: {error}", ok=False, error=error,
                   args=dict(args or {}), data={"evidence": None, "found": False})



def jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples to plain JSON types; NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between: how evidence values are made."""
    if not math.isfinite(x):
        return 1.0 if x > 0 else 0.0
    return float(min(max((x - lo) / (hi - lo), 0.0), 1.0))


def evidence_mask(excess: np.ndarray, lo: float, hi: float, valid: np.ndarray | None = None) -> EvidenceMask:
    """The per-pixel form of a tool's evidence: ``ramp(excess, lo, hi)`` (0 outside ``valid``),
    downscaled to :data:`MASK_SIDE` by area averaging and encoded as a uint8 PNG."""
    values = np.clip((np.nan_to_num(np.asarray(excess, np.float32)) - lo) / (hi - lo), 0.0, 1.0)
    if valid is not None:
        values = values * valid
    h, w = values.shape
    scale = min(1.0, MASK_SIDE / max(h, w))
    if scale < 1.0:
        values = cv2.resize(values, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    grey = np.round(values * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".png", grey, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ValueError(f"could not encode an evidence mask of shape {grey.shape}")
    return EvidenceMask(buf.tobytes(), (int(grey.shape[0]), int(grey.shape[1])))


def decode_mask(mask: EvidenceMask | dict[str, Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """An evidence mask (or its state form) as float32 (H, W) in [0, 1], resized (bilinear) to
    ``shape`` when given. Raises ValueError for bytes that are not a greyscale PNG."""
    png = mask.png if isinstance(mask, EvidenceMask) else (mask or {}).get("png")
    grey = cv2.imdecode(np.frombuffer(png or b"", np.uint8), cv2.IMREAD_GRAYSCALE) if png else None
    if grey is None:
        raise ValueError("evidence mask is not a readable PNG")
    values = grey.astype(np.float32) / 255.0
    if shape is not None and values.shape != tuple(shape):
        values = cv2.resize(values, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
    return values


def image_payload(name: str, image: np.ndarray, caption: str, *, fmt: str = "JPEG") -> ObservationImage:
    """Encode an RGB array for the VLM, longest side at most :data:`MAX_IMAGE_SIDE` (a panel of
    views: shrunk as one, :func:`~anomalyclaw.imaging.view_longest`)."""
    return ObservationImage(name, encode_image(view_longest(image, MAX_IMAGE_SIDE), fmt), caption)


def with_notes(text: str, notes: Sequence[str]) -> str:
    """Argument fixes first (so the model learns what it asked wrong), then the finding."""
    return ("Note: " + "; ".join(notes) + ". " if notes else "") + text


def clip_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
