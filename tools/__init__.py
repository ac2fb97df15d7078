"""The 13-tool catalog: LangChain vision tools that test candidate anomalies against references.

``ToolRegistry.default()`` holds the catalog; a runner builds one :class:`ItemContext` per item
and passes it in each call's ``config["configurable"][CONTEXT_KEY]``. Every tool returns an
:class:`Observation` (text for the VLM, images, and numbers with an ``evidence`` in [0, 1]).
"""
from .base import Applicability, Observation, ObservationImage, ToolArgumentError
from .context import CONTEXT_KEY, ItemContext
from .registry import TOOL_NAMES, ToolRegistry, run_tool_on_item

__all__ = ["Applicability", "CONTEXT_KEY", "ItemContext", "Observation", "ObservationImage",
           "TOOL_NAMES", "ToolArgumentError", "ToolRegistry", "run_tool_on_item"]
