"""The observation every tool returns, bbox validation, evidence ramps, and the tool factory.

Every tool in the catalog is built by :func:`make_tool`: a LangChain ``StructuredTool`` with
``response_format="content_and_artifact"`` whose content is :attr:`Observation.text` (what the
VLM reads) and whose artifact is the :class:`Observation`. The tool function reads the item from
``config["configurable"][CONTEXT_KEY]``, so the model-facing schema holds only pydantic arguments
and a model can never make a tool read a path. A tool never raises: bad arguments, unreadable
images and bugs all become ``Observation(ok=False, error=...)``.
"""
from __future__ import annotations

import base64
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, ValidationError

from anomalyclaw.domains import TRAITS
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.imaging import encode_image
from anomalyclaw.items import Item

from .context import CONTEXT_KEY, ItemContext

#: Longest side of any image a tool returns, in pixels.
MAX_IMAGE_SIDE = 768
#: Observation text is cut to this many characters (the VLM reads it every turn).
MAX_TEXT_CHARS = 1200


class ToolArgumentError(AnomalyClawError):
    """An argument the model passed cannot be used; the message says how to fix it."""


@dataclass
class ObservationImage:
    """One image a tool returns: encoded bytes (PNG or JPEG, longest side <= 768 px)."""

    name: str
    data: bytes
    caption: str


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

    def to_json(self, with_images: bool = False) -> dict[str, Any]:
        """JSON-serialisable form; images as captions only unless ``with_images`` (base64)."""
        out = {"tool": self.tool, "text": self.text, "data": _jsonable(self.data), "ok": self.ok,
               "applicable": self.applicable, "error": self.error,
               "elapsed_s": round(self.elapsed_s, 4), "args": _jsonable(self.args),
               "images": [{"name": im.name, "caption": im.caption, "bytes": len(im.data)}
                          for im in self.images]}
        if with_images:
            for entry, im in zip(out["images"], self.images):
                entry["data_b64"] = base64.b64encode(im.data).decode("ascii")
        return out

    @classmethod
    def failure(cls, tool: str, error: str, *, args: dict[str, Any] | None = None) -> "Observation":
        return cls(tool=tool, text=f"{tool} failed: {error}", ok=False, error=error,
                   args=dict(args or {}), data={"evidence": None, "found": False})

    @classmethod
    def not_applicable(cls, tool: str, why: str, *, args: dict[str, Any] | None = None) -> "Observation":
        return cls(tool=tool, text=f"{tool} not applicable: {why}", ok=True, applicable=False,
                   error=None, args=dict(args or {}), data={"evidence": None, "found": False})


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples to plain JSON types; NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


# ------------------------------------------------------------------------------ applicability

_NEEDS_REFS = re.compile(r"^references>=(\d+)$")


@dataclass(frozen=True)
class Applicability:
    """Which items a tool can work on, in the words of :data:`anomalyclaw.domains.TRAITS`.

    ``requires``: traits that must all be present, or special needs such as ``"references>=2"``;
    ``any_of``: at least one of these traits (empty: no condition); ``excludes``: none of these;
    ``note``: what the tool needs, in words; ``instead``: the tool to suggest when it does not apply.
    """

    requires: frozenset[str] = frozenset()
    any_of: frozenset[str] = frozenset()
    excludes: frozenset[str] = frozenset()
    note: str = ""
    instead: str = ""

    def __post_init__(self) -> None:
        for name in ("requires", "any_of", "excludes"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        words = self.requires | self.any_of | self.excludes
        unknown = {w for w in words if w not in TRAITS and not _NEEDS_REFS.match(w)}
        if unknown:
            raise ValueError(f"unknown applicability words {sorted(unknown)}; use traits "
                             f"{sorted(TRAITS)} or 'references>=N'")

    def check(self, item: Item) -> tuple[bool, str]:
        """(applicable, why not): ``why`` names the domain, its traits and an alternative tool."""
        traits = item.traits
        card = item.domain_card
        domain = f"{item.domain_code} {card.name}" + (f" ({item.category})" if item.category else "")
        has = f"{domain} has traits [{', '.join(sorted(traits)) or 'none'}]"
        hint = f"; use {self.instead} instead" if self.instead else ""
        for need in sorted(self.requires):
            match = _NEEDS_REFS.match(need)
            if match:
                n = int(match.group(1))
                if len(item.ref_paths) < n:
                    return False, (f"needs at least {n} reference images; item {item.item_id} has "
                                   f"{len(item.ref_paths)}{hint}")
            elif need not in traits:
                return False, f"needs trait '{need}' ({TRAITS[need]}); {has}{hint}"
        if self.any_of and not (self.any_of & traits):
            return False, f"needs one of the traits {sorted(self.any_of)}; {has}{hint}"
        clash = self.excludes & traits
        if clash:
            return False, f"does not apply to items with trait(s) {sorted(clash)}; {has}{hint}"
        return True, ""

    def to_json(self) -> dict[str, Any]:
        return {"requires": sorted(self.requires), "any_of": sorted(self.any_of),
                "excludes": sorted(self.excludes), "note": self.note, "instead": self.instead}


# --------------------------------------------------------------------------------------- bbox

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


# ----------------------------------------------------------------------------------- evidence

def ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below ``lo``, 1 at or above ``hi``, linear between: how evidence values are made."""
    if not math.isfinite(x):
        return 1.0 if x > 0 else 0.0
    return float(min(max((x - lo) / (hi - lo), 0.0), 1.0))


def clamp_arg(args: BaseModel, name: str, lo: float, hi: float, notes: list[str]) -> float:
    """``args.<name>`` clamped to [lo, hi]. When the caller set it explicitly and it changed, a
    note for the observation says so (a default that does not fit this item is adjusted silently)."""
    value = getattr(args, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolArgumentError(f"{name} must be a finite number in [{lo:g}, {hi:g}]; got {value!r}")
    clamped = min(max(value, lo), hi)
    if clamped != value and name in args.model_fields_set:
        notes.append(f"{name}={value:g} is outside [{lo:g}, {hi:g}]; used {clamped:g}")
    return type(value)(clamped) if isinstance(value, int) and not isinstance(value, bool) else clamped


def image_payload(name: str, image: np.ndarray, caption: str, *, fmt: str = "JPEG") -> ObservationImage:
    """Encode an RGB array for the VLM, longest side at most :data:`MAX_IMAGE_SIDE`."""
    return ObservationImage(name, encode_image(image, fmt, max_side=MAX_IMAGE_SIDE), caption)


def with_notes(text: str, notes: Sequence[str]) -> str:
    """Argument fixes first (so the model learns what it asked wrong), then the finding."""
    return ("Note: " + "; ".join(notes) + ". " if notes else "") + text


def clip_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


# ------------------------------------------------------------------------------- tool factory

ToolImpl = Callable[[ItemContext, Any], Observation]


def context_from_config(config: RunnableConfig | None) -> ItemContext:
    ctx = ((config or {}).get("configurable") or {}).get(CONTEXT_KEY)
    if not isinstance(ctx, ItemContext):
        raise ToolArgumentError(
            f"no ItemContext in config['configurable'][{CONTEXT_KEY!r}]: the runner must pass the "
            "item under judgment there (tools never take paths from the model)")
    return ctx


def validation_message(exc: ValidationError, schema: type[BaseModel]) -> str:
    """A pydantic error as one line per bad field, plus the accepted arguments."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(arguments)"
        parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
    accepted = ", ".join(f"{name}: {f.description or f.annotation}"
                         for name, f in schema.model_fields.items())
    return "invalid arguments: " + "; ".join(parts) + f". Accepted arguments: {accepted}"


def run_impl(name: str, impl: ToolImpl, schema: type[BaseModel], ctx: ItemContext,
             raw_args: dict[str, Any], applicability: Applicability | None = None) -> Observation:
    """Validate, check applicability, run ``impl``; every failure becomes an Observation."""
    start = time.perf_counter()
    args_for_record = dict(raw_args) if isinstance(raw_args, dict) else {"(raw)": repr(raw_args)}
    try:
        if not isinstance(raw_args, dict):
            raise ToolArgumentError(f"arguments must be a JSON object, got {type(raw_args).__name__}")
        ignored = sorted(set(raw_args) - set(schema.model_fields))
        try:
            args = schema.model_validate({k: v for k, v in raw_args.items() if k not in ignored})
        except ValidationError as exc:
            raise ToolArgumentError(validation_message(exc, schema)) from None
        args_for_record = args.model_dump()
        if applicability is not None:
            ok, why = applicability.check(ctx.item)
            if not ok:
                obs = Observation.not_applicable(name, why, args=args_for_record)
                return _finish(obs, ctx, start)
        obs = impl(ctx, args)
        obs.tool = name
        obs.args = {**args_for_record, **obs.args}
        if ignored:
            note = f"ignored unknown argument(s) {ignored}; accepted: {sorted(schema.model_fields)}"
            obs.text = note + ". " + obs.text
            obs.data.setdefault("notes", []).append(note)
    except ToolArgumentError as exc:
        obs = Observation.failure(name, str(exc), args=args_for_record)
    except AnomalyClawError as exc:  # unreadable image, missing weights: the message says what to do
        obs = Observation.failure(name, str(exc), args=args_for_record)
    except Exception as exc:  # a tool bug must not end the item's run; the record keeps the error
        obs = Observation.failure(name, f"internal error {type(exc).__name__}: {exc}", args=args_for_record)
    return _finish(obs, ctx, start)


def _finish(obs: Observation, ctx: ItemContext, start: float) -> Observation:
    obs.text = clip_text(obs.text)
    obs.data = _jsonable(obs.data)
    obs.elapsed_s = time.perf_counter() - start
    ctx.observations.append(obs)
    return obs


def make_tool(name: str, description: str, schema: type[BaseModel], impl: ToolImpl, *,
              family: str, specialty: str, applicability: Applicability | None = None) -> StructuredTool:
    """A LangChain tool around ``impl(ctx, args) -> Observation``.

    The tool advertises ``schema``'s JSON schema to the model but receives the raw arguments
    (LangChain does not validate a JSON-schema ``args_schema``): :func:`run_impl` validates them
    with ``schema`` so that a bad argument becomes an Observation the model can act on, never an
    exception. ``metadata`` holds ``family``, ``specialty``, ``applicability`` and ``args_model``
    (the pydantic class), which :class:`~anomalyclaw.tools.registry.ToolRegistry` reads.
    """

    def call(config: RunnableConfig, **kwargs: Any) -> tuple[str, Observation]:
        try:
            ctx = context_from_config(config)
        except ToolArgumentError as exc:
            obs = Observation.failure(name, str(exc), args=kwargs)
            return obs.text, obs
        obs = run_impl(name, impl, schema, ctx, kwargs, (tool.metadata or {}).get("applicability"))
        return obs.text, obs

    json_schema = schema.model_json_schema()
    json_schema["title"] = name
    json_schema["description"] = description
    tool = StructuredTool(name=name, description=description, args_schema=json_schema, func=call,
                          response_format="content_and_artifact",
                          metadata={"family": family, "specialty": specialty,
                                    "applicability": applicability, "args_model": schema})
    return tool
