"""The 13-tool catalog: LangChain vision tools that test candidate anomalies against references.

``ToolRegistry.default()`` holds the catalog; a runner builds one :class:`ItemContext` per item
and passes it in each call's ``config["configurable"][CONTEXT_KEY]``. Every tool returns an
:class:`Observation` (text for the VLM, images, and numbers with an ``evidence`` in [0, 1]);
:meth:`ToolRegistry.check_call` is the one guard a call passes (name, applicability, arguments).
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "registry": ["ALIASES", "TOOL_NAMES", "ToolEntry", "ToolRegistry", "run_tool_on_item"],
    "item_context": ["CONTEXT_KEY", "ItemContext"],
    "observation": ["Observation", "ObservationImage", "image_payload", "ramp", "with_notes"],
    "applicability": ["Applicability"],
    "guard": ["CheckedCall", "ToolArgumentError"],
    "factory": ["make_tool"],
    "regions": ["BBOX_DESCRIPTION", "Region", "resolve_bbox"],
})
