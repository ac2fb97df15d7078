"""The agent: typed state, the refutation StateGraph, the one-node direct graph, the pipeline
that runs both, fuses and localizes, the run context, the VLM seam and its backends, and reply
parsing.

    from anomalyclaw.graph import build_pipeline, make_context, make_vlm, new_state

Names are imported on first use, so importing one module of the package stays cheap.
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "pipeline": ["build_pipeline", "thread_config"],
    "refutation": ["build_refutation_graph"],
    "direct": ["build_direct_graph"],
    "context": ["RunContext", "make_context"],
    "state": ["DirectState", "PipelineState", "RefuteState", "new_state"],
    "images": ["ImageEncoder"],
    "stream": ["format_event", "format_update"],
    "toolcalling": ["ToolCalling"],
    "localization": ["DEFAULT_RULE", "LocalizationInputs", "LocalizationRule", "Region", "fuse_map"],
    "localize": ["decode_map", "encode_map", "localize_state"],
    "replies": ["FORMATS", "ReplyError", "parse_reply"],
    "vlm": ["VLM", "ChatVLM", "OfflineVLM", "OpenAIVLM", "RunView", "VLMError", "VLMReply", "make_vlm"],
})
