"""AnomalyClaw: training-free visual anomaly detection by tool-grounded refutation.

The façade: the names a notebook needs, imported lazily so that ``import anomalyclaw`` is cheap
and nothing cycles (parts import downwards only: eval -> graph -> tools -> experts -> core).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "Item": "anomalyclaw.items",
    "DomainCard": "anomalyclaw.domains",
    "EndpointConfig": "anomalyclaw.config",
    "AgentConfig": "anomalyclaw.config",
    "load_image": "anomalyclaw.imaging",
    "load_manifest": "anomalyclaw.eval.data.manifests",
    "read_manifest": "anomalyclaw.eval.data.manifests",
    "write_manifest": "anomalyclaw.eval.data.manifests",
    "Record": "anomalyclaw.eval.running.records",
    "load_records": "anomalyclaw.eval.running.records",
    "evaluate": "anomalyclaw.eval.scoring.metrics",
    "Runner": "anomalyclaw.eval.running.runner",
    "generate_benchmark": "anomalyclaw.eval.data.synth",
    "import_mvtec_folder": "anomalyclaw.eval.data.folders",
    "build_pipeline": "anomalyclaw.graph.pipeline",
    "build_refutation_graph": "anomalyclaw.graph.refutation",
    "build_direct_graph": "anomalyclaw.graph.direct",
    "make_context": "anomalyclaw.graph.context",
    "new_state": "anomalyclaw.graph.state",
    "make_vlm": "anomalyclaw.graph.vlm",
    "ToolRegistry": "anomalyclaw.tools.registry",
    "ItemContext": "anomalyclaw.tools.item_context",
    "PromptSet": "anomalyclaw.prompts",
    "ExpertPool": "anomalyclaw.experts.pool",
    "load_backbone": "anomalyclaw.experts.backbones",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalyclaw' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
