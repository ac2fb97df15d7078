"""AnomalyClaw: training-free visual anomaly detection by tool-grounded refutation.

The façade: the names a notebook or script needs, imported on first use so that
``import anomalyclaw`` is cheap and nothing cycles (parts import downwards only:
eval -> graph -> tools -> experts, prompts -> core)::

    from anomalyclaw import build_pipeline, load_manifest, make_context, make_vlm, new_state
"""
import lazy_loader as _lazy

from .version import __version__

__getattr__, __dir__, _names = _lazy.attach(__name__, submod_attrs={
    "items": ["Item"],
    "domains": ["DomainCard"],
    "config": ["AgentConfig", "EndpointConfig"],
    "imaging": ["encode_image", "load_image"],
    "cache": ["cache_stats", "clear_caches"],
    "eval.data.manifests": ["load_manifest", "read_manifest", "write_manifest"],
    "eval.data.folders": ["import_mvtec_folder"],
    "eval.data.synth": ["generate_benchmark"],
    "eval.running.records": ["Record", "load_records"],
    "eval.running.runner": ["Runner", "run_items"],
    "eval.scoring.metrics": ["evaluate"],
    "eval.scoring.pixels": ["evaluate_pixels"],
    "eval.scoring.thresholds": ["choose_threshold", "decision_metrics"],
    "eval.scoring.tables": ["format_table"],
    "eval.reports.html": ["build_report", "draw_localization"],
    "eval.reports.plots": ["plot_roc_curves"],
    "graph.pipeline": ["build_pipeline", "thread_config"],
    "graph.refutation": ["build_refutation_graph"],
    "graph.direct": ["build_direct_graph"],
    "graph.context": ["make_context"],
    "graph.messages": ["direct_messages"],
    "graph.state": ["new_state"],
    "graph.stream": ["format_event", "format_update"],
    "graph.localize": ["decode_map"],
    "graph.vlm.factory": ["make_vlm"],
    "tools.registry": ["ToolRegistry"],
    "tools.item_context": ["ItemContext"],
    "tools.factory": ["make_tool"],
    "tools.observation": ["Observation"],
    "prompts": ["PromptSet"],
    "experts.pool": ["ExpertPool", "default_pool"],
    "experts.backbones": ["load_backbone"],
})
__all__ = ["__version__", *_names]
