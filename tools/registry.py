"""The tool registry: the catalog the prompt is rendered from, name repair, applicability, runs.

The prompt's tool list comes from :meth:`ToolRegistry.render`, so adding, dropping or swapping
a tool needs no prompt edit. :meth:`ToolRegistry.run` / :meth:`ToolRegistry.arun` are how the
graph calls a tool: :meth:`ToolRegistry.check_call` (the guard: name repair, applicability,
argument validation) runs once, then the LangChain tool; they never raise, and the observation
they return is the only one a call produces. Inside a LangGraph run each call is also a pair of
``stream_mode="custom"`` events, ``tool_start`` and ``tool_end`` (with its latency).
:meth:`ToolRegistry.openai_tools` gives the tools' function schemas for native tool calling.
"""
from __future__ import annotations

import asyncio
import difflib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from langchain_core.tools import BaseTool
from pydantic import BaseModel

from anomalyclaw.events import emit
from anomalyclaw.items import Item

from .applicability import Applicability
from .item_context import CONTEXT_KEY, ItemContext
from .factory import CHECKED_KEY, args_json_schema, finish
from .guard import CheckedCall, check_arguments
from .observation import Observation
from .regions import BBOX_DESCRIPTION

log = logging.getLogger(__name__)


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
    "texture_fft": "fft_spectrum_viz",
}


@dataclass
class ToolEntry:
    tool: BaseTool
    family: str
    specialty: str
    applicability: Applicability
    builtin: bool = False
    """From the 13-tool catalog as :meth:`ToolRegistry.default` built it (another process can
    build the same tool again from its name)."""


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
        self._functions: dict[str, dict[str, Any]] = {}
        self._compact: dict[str, dict[str, str]] = {}  # compact_args, read by every item's prompt

    @classmethod
    def default(cls) -> "ToolRegistry":
        """The 13-tool catalog (fresh tool objects: editing one registry never changes another)."""
        from . import inspection, probes, references, structure

        registry = cls()
        built = {t.name: t for module in (inspection, references, probes, structure) for t in module.build_tools()}
        for name in TOOL_NAMES:
            tool = built[name]
            registry.add(tool, family=tool.metadata["family"], specialty=tool.metadata["specialty"])
            registry._entries[name].builtin = True
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
        self._forget(tool.name)

    def drop(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(f"no tool {name!r} in the registry; registered: {self.names()}")
        del self._entries[name]
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop what was derived from the tool ``name`` (it was replaced or dropped)."""
        for derived in (self._schemas, self._functions, self._compact):
            derived.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def custom_names(self) -> list[str]:
        """Tools added (or replaced) with :meth:`add` rather than taken from the catalog."""
        return [name for name, entry in self._entries.items() if not entry.builtin]

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
                schema = args_json_schema(model)  # this registry's own copy
            else:
                schema = self._entries[name].tool.args_schema
                schema = schema if isinstance(schema, dict) else schema.model_json_schema()
            self._schemas[name] = schema
        return self._schemas[name]

    def compact_args(self, name: str) -> dict[str, str]:
        """``{"arg": "type (default ...): description"}`` for the prompt; a bbox is written as
        ``[x0,y0,x1,y1] in 0-1`` plus what it means for this tool."""
        if name not in self._compact:
            self._compact[name] = self._compact_args(name)
        return dict(self._compact[name])

    def _compact_args(self, name: str) -> dict[str, str]:
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

    def render(self, item: Item | None = None, *, args: bool = True) -> str:
        """The tool list for the prompt: one line per tool applicable to ``item`` (all when None):
        name, one-line specialty, arguments as compact JSON (left out with ``args=False``: native
        tool calling sends each tool's schema beside the messages)."""
        lines = []
        for entry in self._entries.values():
            if item is not None and not entry.applicability.check(item)[0]:
                continue
            if args:
                compact = json.dumps(self.compact_args(entry.tool.name), separators=(",", ":"))
                lines.append(f"- {entry.tool.name}: {entry.specialty}. args {compact}")
            else:
                lines.append(f"- {entry.tool.name}: {entry.specialty}")
        return "\n".join(lines)

    def openai_tools(self, names: Any = None) -> list[dict[str, Any]]:
        """The function schemas of native tool calling (``bind_tools`` / the ``tools`` field of an
        OpenAI request), for ``names`` (default: every tool): the tool's name and description and
        its pydantic argument model's JSON schema."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        out = []
        for name in self.names() if names is None else names:
            if name not in self._functions:
                self._functions[name] = convert_to_openai_tool(self.get(name))
            out.append(self._functions[name])
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Every tool as a JSON-ready dict (for ``anomalyclaw tools --json``): name, family,
        specialty, description, applicability, ``args`` (compact, as the prompt shows them) and
        ``args_schema`` (the JSON schema)."""
        return [{"name": e.tool.name, "family": e.family, "specialty": e.specialty,
                 "description": e.tool.description, "applicability": e.applicability.to_json(),
                 "args": self.compact_args(e.tool.name), "args_schema": self.args_schema(e.tool.name)}
                for e in self._entries.values()]

    # ------------------------------------------------------------------------------- running
    def check_call(self, name: Any, args: Any, item: Item, *,
                   default_bbox: list[float] | None = None) -> CheckedCall | Observation:
        """The guard: resolve the name (repairing near misses), check that the tool applies to
        ``item`` and validate the arguments. ``default_bbox`` fills a missing ``bbox`` argument
        (the box of the candidate under test is what the model means). Returns the checked call,
        or a rejected Observation that says why and what to do instead."""
        canonical, message = self.resolve(name)
        if canonical is None:
            return Observation.rejected(str(name), message, args=args if isinstance(args, dict) else {},
                                        applicable=False)
        entry = self._entries[canonical]
        schema = (entry.tool.metadata or {}).get("args_model")
        if isinstance(args, dict) and default_bbox and schema is not None and "bbox" in schema.model_fields \
                and args.get("bbox") is None:
            args = {**args, "bbox": default_bbox}
        notes = (message,) if message else ()
        checked = check_arguments(canonical, schema, entry.applicability, item, args, notes=notes)
        if isinstance(checked, Observation):
            if not checked.applicable:
                usable = [t.name for t, ok, _ in self.applicable(item) if ok]
                why = f"{checked.error}. Tools that apply: {', '.join(usable)}"
                checked = Observation.rejected(canonical, why, args=checked.args, applicable=False)
            return checked
        return CheckedCall(checked.tool, checked.args, checked.notes,
                           repaired_from=str(name) if canonical != name else None,
                           requested=dict(args) if isinstance(args, dict) else None)

    def _invocation(self, call: CheckedCall, context: ItemContext) -> tuple[dict[str, Any], dict[str, Any]]:
        tool_call = {"name": call.tool, "args": call.args_dict(), "id": f"call_{uuid.uuid4().hex[:12]}",
                     "type": "tool_call"}
        return tool_call, {"configurable": {CONTEXT_KEY: context, CHECKED_KEY: call}}

    @staticmethod
    def _observation(call: CheckedCall, message: Any, start: float) -> Observation:
        obs = getattr(message, "artifact", None)
        if isinstance(obs, Observation):  # a catalog tool: it ran the call as checked, notes included
            return obs
        content = getattr(message, "content", message)  # a plain LangChain tool: its content is the text
        return finish(Observation(call.tool, text=str(content), data={"evidence": None}, args=call.args_dict()),
                      call, start)

    def run(self, name: str, args: dict | None, context: ItemContext, *,
            default_bbox: list[float] | None = None) -> Observation:
        """Run tool ``name`` on the item in ``context`` (the guard, :meth:`check_call`, then the
        tool); every failure is an Observation."""
        start = time.perf_counter()
        call = self.check_call(name, args, context.item, default_bbox=default_bbox)
        if isinstance(call, Observation):
            return _logged(finish(call, None, start), context)
        _started(call, context)
        try:
            message = self._entries[call.tool].tool.invoke(*self._invocation(call, context))
            obs = self._observation(call, message, start)
        except Exception as exc:  # plain tools may raise; the catalog's never do
            obs = finish(Observation.failure(call.tool, f"{type(exc).__name__}: {exc}", args=call.args_dict()),
                         None, start)
        return _finished(_logged(obs, context), context)

    async def arun(self, name: str, args: dict | None, context: ItemContext, *,
                   default_bbox: list[float] | None = None) -> Observation:
        """:meth:`run` for async callers: the image work runs in a worker thread."""
        call = self.check_call(name, args, context.item, default_bbox=default_bbox)
        if isinstance(call, Observation):
            return _logged(finish(call, None, time.perf_counter()), context)
        return await self.arun_checked(call, context)

    async def arun_checked(self, call: CheckedCall, context: ItemContext) -> Observation:
        """Run a call that passed :meth:`check_call` (the graph checks in ``select_tool``)."""
        start = time.perf_counter()
        _started(call, context)
        try:
            message = await self._entries[call.tool].tool.ainvoke(*self._invocation(call, context))
            obs = self._observation(call, message, start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            obs = finish(Observation.failure(call.tool, f"{type(exc).__name__}: {exc}", args=call.args_dict()),
                         None, start)
        return _finished(_logged(obs, context), context)


def _started(call: CheckedCall, context: ItemContext) -> None:
    emit("tool_start", item_id=context.item.item_id, tool=call.tool, args=call.args_dict())


def _finished(obs: Observation, context: ItemContext) -> Observation:
    emit("tool_end", item_id=context.item.item_id, tool=obs.tool, ok=obs.ok, latency_s=round(obs.elapsed_s, 4),
         evidence=obs.data.get("evidence"), images=[im.name for im in obs.images], error=obs.error)
    return obs


def _logged(obs: Observation, context: ItemContext) -> Observation:
    """``obs``, after one INFO line saying which tool ran on which item and what came of it
    (``anomalyclaw -v`` shows these)."""
    if log.isEnabledFor(logging.INFO):
        evidence = (obs.data or {}).get("evidence")
        outcome = (f"evidence {evidence:.3f}" if isinstance(evidence, (int, float)) else "no evidence") \
            if obs.ok else f"failed: {str(obs.error)[:200]}"
        log.info("item %s: tool %s %s -> %s (%.0f ms)", context.item.item_id, obs.tool,
                 json.dumps(obs.args, default=str), outcome, 1000 * (obs.elapsed_s or 0.0))
    return obs


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
