"""LangGraph Studio and ``langgraph dev``: the pipeline, the refutation graph and the direct graph.

``langgraph.json`` at the repository root names the three factories below, so ``langgraph dev``
(``pip install "langgraph-cli[inmem]"``) serves them and Studio opens them. A server cannot hand
a run a :class:`~anomalyclaw.graph.context.RunContext` (an object holding the item's images, the
VLM, the tools), so these graphs take a :class:`StudioContext` instead: plain settings that
Studio shows as a form and a client sends as JSON (``"context": {...}``); each node resolves
them to the run context of the item the input names (``{"item_id": "S2_0003"}``; without one,
the manifest's first item).

Defaults: the manifest is ``ANOMALYCLAW_MANIFEST``, else the demo's
``anomalyclaw-demo/synth/manifest.json`` (written by ``anomalyclaw demo``, or generated here on
first use); the backend is ``openai`` with the endpoint from the environment
(``ANOMALYCLAW_BASE_URL``, ``ANOMALYCLAW_MODEL``, ``ANOMALYCLAW_API_KEY``) when
``ANOMALYCLAW_BASE_URL`` is set, else ``offline``.

This module wires the graphs to the data layer, as the command line does, so it sits at the top.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from typing_extensions import TypedDict

from .cache import LRUCache
from .errors import ConfigError

__all__ = ["DEMO_MANIFEST", "ItemInput", "StudioContext", "make_direct", "make_pipeline", "make_refutation"]

log = logging.getLogger(__name__)

#: The manifest a Studio run reads when neither the context nor ANOMALYCLAW_MANIFEST names one
#: (relative to the folder ``langgraph dev`` runs in, where ``anomalyclaw demo`` writes it).
DEMO_MANIFEST = Path("anomalyclaw-demo") / "synth" / "manifest.json"


class ItemInput(TypedDict, total=False):
    """What a Studio run takes as input: the id of a manifest item."""

    item_id: str


_contexts: LRUCache[tuple, Any] = LRUCache("studio.run_contexts", max_items=16)
_items: LRUCache[tuple, dict] = LRUCache("studio.manifests", max_items=4)
_shared: dict[tuple, Any] = {}
_lock = threading.Lock()


@dataclass
class StudioContext:
    """A Studio run's settings (every field has a default: an empty form works)."""

    manifest: str = ""
    """Manifest file or folder; default ANOMALYCLAW_MANIFEST, else the demo's."""
    split: str = "test"
    """The manifest split items are looked up in ("" for all)."""
    backend: str = ""
    """offline or openai; default openai when ANOMALYCLAW_BASE_URL is set, else offline."""
    tool_calling: str = "json"
    """json, native or auto (see ``anomalyclaw run --tool-calling``)."""
    max_turns: int = 3
    """Refutation turns before a forced commit."""

    def _backend(self) -> str:
        backend = self.backend or ("openai" if os.environ.get("ANOMALYCLAW_BASE_URL") else "offline")
        if backend not in ("offline", "openai"):
            raise ConfigError(f"StudioContext.backend must be offline or openai, got {backend!r}")
        return backend

    def _manifest(self) -> Path:
        if self.manifest or os.environ.get("ANOMALYCLAW_MANIFEST"):
            return Path(self.manifest or os.environ["ANOMALYCLAW_MANIFEST"]).expanduser()
        path = DEMO_MANIFEST.resolve()
        if not path.exists():
            from anomalyclaw.eval.data.synth import generate_benchmark

            log.warning("no manifest named (StudioContext.manifest or ANOMALYCLAW_MANIFEST): generating the "
                        "synthetic benchmark in %s", path.parent)
            generate_benchmark(path.parent, seed=0)
        return path

    def _item(self, item_id: str | None):
        from anomalyclaw.eval.data.manifests import load_manifest

        path = self._manifest()
        key = (str(path.resolve()), self.split)
        items = _items.get_or_compute(key, lambda: {it.item_id: it for it in load_manifest(
            path, split=self.split or None)})
        if not items:
            raise ConfigError(f"manifest {path} has no items in split {self.split!r}")
        if not item_id:
            return next(iter(items.values()))
        if item_id not in items:
            some = ", ".join(list(items)[:5])
            raise ConfigError(f"no item {item_id!r} in {path} (split {self.split!r}; {len(items)} items, e.g. {some})")
        return items[item_id]

    def _shared(self, backend: str) -> tuple[Any, Any]:
        """The VLM and the tool-calling memory Studio runs with the same settings share."""
        from anomalyclaw.graph.toolcalling import ToolCalling
        from anomalyclaw.graph.vlm import make_vlm

        from .config import EndpointConfig

        key = (backend, self.tool_calling)
        with _lock:
            if key not in _shared:
                vlm = make_vlm("offline") if backend == "offline" else make_vlm("openai", EndpointConfig.from_env())
                _shared[key] = (vlm, ToolCalling(self.tool_calling))
            return _shared[key]

    def resolve(self, state: Mapping[str, Any]) -> Any:
        """The run context of the item ``state`` names, built once per item and settings: images
        loaded, references ranked and the first messages' images encoded (this reads files; the
        nodes call it from a worker thread)."""
        from anomalyclaw.graph.context import make_context
        from anomalyclaw.graph.messages import warm_images

        from .config import AgentConfig

        backend = self._backend()
        item = self._item(state.get("item_id"))
        config = AgentConfig(max_turns=self.max_turns, tool_calling=self.tool_calling)

        def build():
            vlm, tool_calling = self._shared(backend)
            run = make_context(item, vlm, config=config, tool_calling=tool_calling)
            run.item_context.preload()
            warm_images(run)
            return run

        key = (str(self._manifest()), self.split, item.item_id, backend, self.tool_calling, self.max_turns)
        return _contexts.get_or_compute(key, build)


def make_pipeline(config: Mapping[str, Any] | None = None):
    """The pipeline (both branches and the fusion) for Studio: ``{"item_id": ...}`` in."""
    from anomalyclaw.graph.pipeline import build_pipeline

    return build_pipeline(context_schema=StudioContext, input_schema=ItemInput)


def make_refutation(config: Mapping[str, Any] | None = None):
    """The refutation branch alone for Studio."""
    from anomalyclaw.graph.refutation import build_refutation_graph

    return build_refutation_graph(context_schema=StudioContext, input_schema=ItemInput)


def make_direct(config: Mapping[str, Any] | None = None):
    """The one-node direct graph for Studio."""
    from anomalyclaw.graph.direct import build_direct_graph

    return build_direct_graph(context_schema=StudioContext, input_schema=ItemInput)
