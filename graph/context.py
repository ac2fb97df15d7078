"""The run context every node reads (LangGraph ``context_schema``): item, VLM, tools, prompts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from anomalyclaw.config import AgentConfig
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.experts.pool import DEFAULT_EXPERT, default_pool
from anomalyclaw.items import Item, Question
from anomalyclaw.prompts import PromptSet
from anomalyclaw.threads import to_compute_thread
from anomalyclaw.tools.item_context import ItemContext
from anomalyclaw.tools.registry import ToolRegistry

from .images import ImageEncoder
from .toolcalling import ToolCalling
from .vlm.seam import VLM, RunView


@dataclass
class RunContext:
    """What one item's run needs besides its state. Build it with :func:`make_context`."""

    item_context: ItemContext
    """The item as tools see it: its images, references and expert results."""
    vlm: VLM
    registry: ToolRegistry
    prompts: PromptSet
    config: AgentConfig = field(default_factory=AgentConfig)
    encoder: ImageEncoder = field(default_factory=ImageEncoder)
    """Data URLs of reference images, shared by the items of a run."""
    question: Question | None = None
    """The multiple-choice question of this run (``--task mcqa``); None for the score task.
    The questions about one image share one ``item_context`` (its images, expert results and
    tool memos), each in its own RunContext."""
    tool_calling: ToolCalling = field(default_factory=ToolCalling)
    """JSON actions or native tool calls (``config.tool_calling``), shared by the items of a run."""

    @property
    def item(self) -> Item:
        """The manifest item under judgment."""
        return self.item_context.item

    def applicable_tools(self) -> tuple[str, ...]:
        """Names of the registry's tools that apply to this item, in prompt order."""
        return self.item_context.item_cached(
            ("applicable_tools", id(self.registry)),
            lambda: tuple(t.name for t, ok, _ in self.registry.applicable(self.item) if ok))

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The applicable tools' function schemas, as native tool calling sends them."""
        return self.item_context.item_cached(("tool_schemas", id(self.registry)),
                                             lambda: self.registry.openai_tools(self.applicable_tools()))

    def view(self, observations: Sequence[Mapping[str, Any]] = ()) -> RunView:
        """The typed view of this run a number-reading backend gets with each call."""
        return RunView(item_id=self.item.item_id, traits=self.item_context.traits, tools=self.applicable_tools(),
                       max_candidates=self.config.max_candidates,
                       expert=lambda: self.item_context.expert_result(DEFAULT_EXPERT),
                       observations=tuple(observations), question=self.question)


def make_context(item: Item | ItemContext, vlm: VLM, *, registry: ToolRegistry | None = None,
                 prompts: PromptSet | None = None, config: AgentConfig | None = None,
                 expert_pool: Any = None, score_cache: Any = None,
                 encoder: ImageEncoder | None = None, question: Question | None = None,
                 tool_calling: ToolCalling | None = None) -> RunContext:
    """A :class:`RunContext` for one item (and, for the multiple-choice task, one question about
    it): the default catalog, prompts and settings unless given, and the process-wide expert pool
    of the configured backbone. Pass the same :class:`ItemContext` for every question about
    one image, so that they share its work. ``tool_calling``: a run's shared
    :class:`ToolCalling` (default: a new one in ``config.tool_calling``'s mode)."""
    config = config or AgentConfig()
    if isinstance(item, Item):
        if expert_pool is None:
            expert_pool = default_pool(config.backbone, config.backbone_path, config.device)
        item = ItemContext(item, work_side=config.work_side, expert_pool=expert_pool, score_cache=score_cache)
    return RunContext(item_context=item, vlm=vlm, registry=registry or ToolRegistry.default(),
                      prompts=prompts or PromptSet.load(), config=config, encoder=encoder or ImageEncoder(),
                      question=question, tool_calling=tool_calling or ToolCalling(config.tool_calling))



def run_context(context: Any, state: Mapping[str, Any]) -> RunContext:
    """The :class:`RunContext` a node works with: the run's context itself, or what a settings
    context (such as :class:`~anomalyclaw.graph.studio.StudioContext`, whose fields a LangGraph
    server fills from JSON) resolves for the item in ``state``."""
    if isinstance(context, RunContext):
        return context
    resolve = getattr(context, "resolve", None)
    if callable(resolve):
        return resolve(state)
    raise AnomalyClawError(
        "the graph has no run context: run it with context=make_context(item, vlm), e.g. "
        "graph.ainvoke(new_state(item.item_id), context=make_context(item, make_vlm('offline')))")


async def arun_context(context: Any, state: Mapping[str, Any]) -> RunContext:
    """:func:`run_context` for async nodes: a settings context resolves in a worker thread (it
    reads the manifest and the item's images, which must not block the event loop)."""
    if isinstance(context, RunContext):
        return context
    if callable(getattr(context, "resolve", None)):
        return await to_compute_thread(run_context, context, state)
    return run_context(context, state)
