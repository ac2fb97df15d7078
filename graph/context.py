"""The run context every node reads (LangGraph ``context_schema``): item, VLM, tools, prompts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anomalyclaw.config import AgentConfig
from anomalyclaw.items import Item
from anomalyclaw.prompts import PromptSet
from anomalyclaw.tools.context import ItemContext
from anomalyclaw.tools.registry import ToolRegistry

from .images import ImageEncoder
from .vlm import VLM


@dataclass
class RunContext:
    """What one item's run needs besides its state. Build it with :func:`make_context`."""

    item: ItemContext
    vlm: VLM
    registry: ToolRegistry
    prompts: PromptSet
    config: AgentConfig = field(default_factory=AgentConfig)
    encoder: ImageEncoder = field(default_factory=ImageEncoder)
    extras: dict[str, Any] = field(default_factory=dict)


def make_context(item: Item | ItemContext, vlm: VLM, *, registry: ToolRegistry | None = None,
                 prompts: PromptSet | None = None, config: AgentConfig | None = None,
                 expert_pool: Any = None, score_cache: Any = None,
                 encoder: ImageEncoder | None = None) -> RunContext:
    """A :class:`RunContext` for one item, with the default catalog and prompts unless given."""
    config = config or AgentConfig()
    if isinstance(item, Item):
        if expert_pool is None:
            from anomalyclaw.experts.pool import ExpertPool
            expert_pool = ExpertPool(config.backbone, backbone_path=config.backbone_path, device=config.device)
        item = ItemContext(item, work_side=config.work_side, expert_pool=expert_pool, score_cache=score_cache)
    return RunContext(item=item, vlm=vlm, registry=registry or ToolRegistry.default(),
                      prompts=prompts or PromptSet.load(), config=config, encoder=encoder or ImageEncoder())
