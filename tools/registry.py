"""The tool registry: the catalog the prompt is rendered from, name repair, applicability, runs.

The prompt's tool list comes from :meth:`ToolRegistry.render`, so adding, dropping or swapping
a tool needs no prompt edit. :meth:`ToolRegistry.run` / :meth:`ToolRegistry.arun` are how the
graph calls a tool: they repair near-miss names, check applicability, validate arguments and
never raise.
"""
from __future__ import annotations

import asyncio
import difflib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from langchain_core.tools import BaseTool
from pydantic import BaseModel

from anomalyclaw.items import Item

from .base import BBOX_DESCRIPTION, Applicability, Observation
from .context import CONTEXT_KEY, ItemContext

__all__ = ["Applicability", "ToolRegistry", "ToolEntry", "run_tool_on_item", "TOOL_NAMES"]

#: The 13 tools of the catalog, in prompt order.
TOOL_NAMES = ("side_by_side_compare", "region_zoom", "segment_anomaly",
              "reference_retriever", "reference_profile", "image_diff", "rotate_align",
              "subspace_ad_score", "anomaly_vfm_score", "expert_heatmap",
              "blob_layout_viz", "change_heatmap_viz", "fft_spectrum_viz")

#: Names models actually produced (the released trajectories, older tool names) -> catalog names.
ALIASES = {
    "side_by_side": "side_by_side_compare",
    "zoom_bbox": "region_zoom",
    "zoom": "region_zoom",
    "expert_score": "anomaly_vfm_score",
    "reference_profiler": "reference_profile",
    "segment_and_count": "segment_anomaly",
    "anomalyvfm_score": "anomaly_vfm_score",
    "subspacead_score": "subspace_ad_score",
}


@dataclass
class ToolEntry:
    tool: BaseTool
    family: str
    specialty: str
    applicability: Applicability


def _canonical(name: str) -> str:
    """Lower case, separators to underscores, a ``tool_``/``functions.`` prefix and ``()`` dropped."""
    text = re.sub(r"\(.*\)$", "", name.strip()).strip().lower()
    text = re.sub(r"[\s\-.:/]+", "_", text).strip("_")
    for prefix in ("functions_", "tool_", "tools_"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


class ToolRegistry:
    """An ordered set of tools with their family, one-line specialty and applicability."""

    def __init__(self) -> None:
        self._entries: dict[str, ToolEntry] = {}
        # JSON schemas are static per tool and pydantic takes ~7 ms to build one: keep them.
        self._schemas: dict[str, dict[str, Any]] = {}

    @classmethod
    def default(cls) -> "ToolRegistry":
        """The 13-tool catalog (fresh tool objects: editing one registry never changes another)."""
        from . import inspection, probes, references, structure

        registry = cls()
        built = {t.name: t for module in (inspection, references, probes, structure) for t in module.build_tools()}
        for name in TOOL_NAMES:
            tool = built[name]
            registry.add(tool, family=tool.metadata["family"], specialty=tool.metadata["specialty"])
        return registry

    # ------------------------------------------------------------------------------- editing
    def add(self, tool: BaseTool, *, family: str, specialty: str,
            applicability: Applicability | None = None) -> None:
        """Register ``tool`` (replacing one of the same name). ``applicability`` defaults to the
        tool's own (``tool.metadata["applicability"]``), else "any item"."""
        if not isinstance(tool, BaseTool):
            raise TypeError(f"expected a LangChain BaseTool, got {type(tool).__name__}")
        meta = dict(tool.metadata or {})
        applicability = applicability or meta.get("applicability") or Applicability()
        meta.update(family=family, specialty=specialty, applicability=applicability)
        tool.metadata = meta
        self._entries[tool.name] = ToolEntry(tool, family, specialty, applicability)
        self._schemas.pop(tool.name, None)

    def drop(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(f"no tool {name!r} in the registry; registered: {self.names()}")
        del self._entries[name]
        self._schemas.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> BaseTool:
        if name not in self._entries:
            raise KeyError(f"no tool {name!r} in the registry; registered: {self.names()}")
        return self._entries[name].tool

    def entry(self, name: str) -> ToolEntry:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[BaseTool]:
        return iter(e.tool for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # ---------------------------------------------------------------------------------- names
    def resolve(self, name: Any) -> tuple[str | None, str]:
        """(canonical name, message). Exact names pass with an empty message; near misses (case,
        dashes, a ``tool_`` prefix, released aliases, an unambiguous close spelling) are repaired
        and the message says so; anything else gives None and a message listing the valid names."""
        valid = ", ".join(self.names())
        if not isinstance(name, str) or not name.strip():
            return None, f"no tool name given ({name!r}); valid tools: {valid}"
        if name in self._entries:
            return name, ""
        key = _canonical(name)
        candidates = [key, ALIASES.get(key, "")]
        for candidate in candidates:
            if candidate in self._entries:
                return candidate, f"tool name {name!r} repaired to {candidate!r}"
        close = difflib.get_close_matches(key, self.names(), n=2, cutoff=0.75)
        if len(close) == 1 or (len(close) == 2 and difflib.SequenceMatcher(None, key, close[0]).ratio()
                               - difflib.SequenceMatcher(None, key, close[1]).ratio() >= 0.1):
            return close[0], f"tool name {name!r} repaired to {close[0]!r}"
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return None, f"unknown tool {name!r}{hint}; valid tools: {valid}"

    # ------------------------------------------------------------------------- applicability
    def applicable(self, item: Item) -> list[tuple[BaseTool, bool, str]]:
        """Every tool with (applicable, why not) for ``item``."""
        out = []
        for entry in self._entries.values():
            ok, why = entry.applicability.check(item)
            out.append((entry.tool, ok, why))
        return out

    def args_model(self, name: str) -> type[BaseModel] | None:
        return (self._entries[name].tool.metadata or {}).get("args_model")

    def args_schema(self, name: str) -> dict[str, Any]:
        """The JSON schema of a tool's arguments."""
        if name not in self._schemas:
            model = self.args_model(name)
            if model is not None:
                schema = model.model_json_schema()
            else:
                schema = self._entries[name].tool.args_schema
                schema = schema if isinstance(schema, dict) else schema.model_json_schema()
            self._schemas[name] = schema
        return self._schemas[name]

    def compact_args(self, name: str) -> dict[str, str]:
        """``{"arg": "type (default ...): description"}`` for the prompt; a bbox is written as
        ``[x0,y0,x1,y1] in 0-1`` plus what it means for this tool."""
        out = {}
        schema = self.args_schema(name)
        required = set(schema.get("required", ()))
        for arg, spec in schema.get("properties", {}).items():
            types = [s.get("type") for s in spec.get("anyOf", [spec]) if s.get("type") not in (None, "null")]
            kind = "|".join(t for t in types if t) or "any"
            description = spec.get("description", "")
            if "enum" in spec:
                kind = "one of " + "/".join(map(str, spec["enum"]))
            if arg == "bbox" and kind == "array":
                kind = "[x0,y0,x1,y1] in 0-1 of the query"
                description = description.replace(BBOX_DESCRIPTION, "").lstrip("; ")
            default = "required" if arg in required else f"default {json.dumps(spec.get('default'))}"
            out[arg] = f"{kind}, {default}" + (f": {description}" if description else "")
        return out

    def render(self, item: Item | None = None) -> str:
        """The tool list for the prompt: one line per tool applicable to ``item`` (all when None):
        name, one-line specialty, arguments as compact JSON."""
        lines = []
        for entry in self._entries.values():
            if item is not None and not entry.applicability.check(item)[0]:
                continue
            args = json.dumps(self.compact_args(entry.tool.name), separators=(",", ":"))
            lines.append(f"- {entry.tool.name}: {entry.specialty}. args {args}")
        return "\n".join(lines)

    def describe(self) -> list[dict[str, Any]]:
        """Every tool as a JSON-ready dict (for ``anomalyclaw tools --json``): name, family,
        specialty, description, applicability, ``args`` (compact, as the prompt shows them) and
        ``args_schema`` (the JSON schema)."""
        return [{"name": e.tool.name, "family": e.family, "specialty": e.specialty,
                 "description": e.tool.description, "applicability": e.applicability.to_json(),
                 "args": self.compact_args(e.tool.name), "args_schema": self.args_schema(e.tool.name)}
                for e in self._entries.values()]

    # ------------------------------------------------------------------------------- running
    def _prepare(self, name: Any, args: Any, context: ItemContext) -> tuple[str | None, Observation | None, list[str]]:
        """(canonical name, an Observation that ends the call early, repair notes)."""
        canonical, message = self.resolve(name)
        if canonical is None:
            return None, Observation.failure(str(name), message, args=args if isinstance(args, dict) else {}), []
        if not isinstance(args, (dict, type(None))):
            return canonical, Observation.failure(
                canonical, f"arguments must be a JSON object, got {type(args).__name__}"), []
        ok, why = self._entries[canonical].applicability.check(context.item)
        if not ok:
            return canonical, Observation.not_applicable(canonical, why, args=args or {}), []
        return canonical, None, [message] if message else []

    @staticmethod
    def _call(canonical: str, args: dict | None) -> dict[str, Any]:
        return {"name": canonical, "args": args or {}, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}

    def _finish(self, canonical: str, message: Any, notes: list[str], args: dict | None) -> Observation:
        obs = getattr(message, "artifact", None)
        if not isinstance(obs, Observation):  # a plain LangChain tool: its content is the text
            content = getattr(message, "content", message)
            obs = Observation(canonical, text=str(content), data={"evidence": None}, args=args or {})
        if notes:
            obs.text = f"Note: {'; '.join(notes)}. {obs.text}"
            obs.data.setdefault("notes", []).extend(notes)
        return obs

    @staticmethod
    def _record(context: ItemContext, obs: Observation) -> Observation:
        """Keep every call in the item's trace (catalog tools record themselves)."""
        if not context.observations or context.observations[-1] is not obs:
            context.observations.append(obs)
        return obs

    def run(self, name: str, args: dict | None, context: ItemContext) -> Observation:
        """Run tool ``name`` on the item in ``context``: the name is repaired or rejected, the
        item's applicability checked, the arguments validated; every failure is an Observation."""
        canonical, early, notes = self._prepare(name, args, context)
        if early is not None:
            return self._record(context, early)
        try:
            message = self._entries[canonical].tool.invoke(self._call(canonical, args),
                                                           config={"configurable": {CONTEXT_KEY: context}})
            obs = self._finish(canonical, message, notes, args)
        except Exception as exc:  # plain tools may raise; the catalog's never do
            obs = Observation.failure(canonical, f"{type(exc).__name__}: {exc}", args=args or {})
        return self._record(context, obs)

    async def arun(self, name: str, args: dict | None, context: ItemContext) -> Observation:
        """:meth:`run` for async callers: the image work runs in a worker thread."""
        canonical, early, notes = self._prepare(name, args, context)
        if early is not None:
            return self._record(context, early)
        try:
            message = await self._entries[canonical].tool.ainvoke(self._call(canonical, args),
                                                                  config={"configurable": {CONTEXT_KEY: context}})
            obs = self._finish(canonical, message, notes, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            obs = Observation.failure(canonical, f"{type(exc).__name__}: {exc}", args=args or {})
        return self._record(context, obs)


def run_tool_on_item(name: str, item: Item, args: dict | None = None, *, out_dir: str | Path | None = None,
                     registry: ToolRegistry | None = None, expert_pool: Any = None,
                     work_side: int = 512) -> Observation:
    """Run one tool on one manifest item (for ``anomalyclaw tools run NAME --manifest M --item ID``).

    With ``out_dir``, the observation's images are written there as
    ``<item_id>_<tool>_<k>_<name>.png|jpg`` and the observation as ``<item_id>_<tool>.json``.
    """
    registry = registry or ToolRegistry.default()
    context = ItemContext(item, work_side=work_side, expert_pool=expert_pool)
    obs = registry.run(name, args or {}, context)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.item_id)
        written = []
        for k, image in enumerate(obs.images):
            ext = "png" if image.data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
            path = out / f"{safe_id}_{obs.tool}_{k}_{image.name}.{ext}"
            path.write_bytes(image.data)
            written.append(str(path))
        record = obs.to_json()
        record["image_files"] = written
        (out / f"{safe_id}_{obs.tool}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return obs
