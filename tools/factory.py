"""The tool factory: every catalog tool is a LangChain ``StructuredTool`` built by :func:`make_tool`.

The tool's content is :attr:`Observation.text` (what the VLM reads) and its artifact the
:class:`~anomalyclaw.tools.observation.Observation` (``response_format="content_and_artifact"``).
The tool function reads the item from ``config["configurable"][CONTEXT_KEY]``, so the
model-facing schema holds only pydantic arguments and a model can never make a tool read a
path. A tool never raises: bad arguments, unreadable images and bugs all become observations.
"""
from __future__ import annotations

import copy
import functools
import time
from typing import Any, Callable

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import StructuredTool
from pydantic import BaseModel

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.threads import compute_slot

from .applicability import Applicability
from .item_context import CONTEXT_KEY, ItemContext
from .guard import CheckedCall, ToolArgumentError, check_arguments
from .observation import Observation, clip_text, jsonable

#: ``config["configurable"]`` key under which the registry hands a tool the call it already
#: checked, so the guard runs once per call.
CHECKED_KEY = "checked_call"

ToolImpl = Callable[[ItemContext, Any], Observation]


@functools.lru_cache(maxsize=256)
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    # Built once per process: every registry (one per runner, worker, Ray actor) makes all 13
    # tools again, and pydantic rebuilds a schema each time it is asked.
    return model.model_json_schema()


def args_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """An arguments model's JSON schema, the caller's own copy of the one built per process."""
    return copy.deepcopy(_model_schema(model))


def context_from_config(config: RunnableConfig | None) -> ItemContext:
    ctx = ((config or {}).get("configurable") or {}).get(CONTEXT_KEY)
    if not isinstance(ctx, ItemContext):
        raise ToolArgumentError(
            f"no ItemContext in config['configurable'][{CONTEXT_KEY!r}]: the runner must pass the "
            "item under judgment there (tools never take paths from the model)")
    return ctx


def run_checked(impl: ToolImpl, ctx: ItemContext, call: CheckedCall) -> Observation:
    """Run ``impl`` on a checked call; every failure becomes an Observation."""
    start = time.perf_counter()
    args = call.args_dict()
    try:
        with compute_slot(f"tool {call.tool}"):
            obs = impl(ctx, call.args)
        obs.tool = call.tool
        obs.args = {**args, **obs.args}
    except ToolArgumentError as exc:
        obs = Observation.failure(call.tool, str(exc), args=args)
    except AnomalyClawError as exc:  # unreadable image, missing weights: the message says what to do
        obs = Observation.failure(call.tool, str(exc), args=args)
    except Exception as exc:  # a tool bug must not end the item's run; the record keeps the error
        obs = Observation.failure(call.tool, f"internal error {type(exc).__name__}: {exc}", args=args)
    return finish(obs, call, start)


def finish(obs: Observation, call: CheckedCall | None, start: float) -> Observation:
    """Notes first (what was repaired), the text bounded, the numbers plain JSON, the time taken."""
    notes = list(call.notes) if call is not None else []
    if notes:
        obs.text = f"Note: {'; '.join(notes)}. {obs.text}"
        obs.data.setdefault("notes", []).extend(notes)
    obs.text = clip_text(obs.text)
    obs.data = jsonable(obs.data)
    obs.elapsed_s = time.perf_counter() - start
    return obs


def make_tool(name: str, description: str, schema: type[BaseModel], impl: ToolImpl, *,
              family: str, specialty: str, applicability: Applicability | None = None) -> StructuredTool:
    """A LangChain tool around ``impl(ctx, args) -> Observation``.

    The tool advertises ``schema``'s JSON schema to the model but receives the raw arguments
    (LangChain does not validate a JSON-schema ``args_schema``): the guard validates them with
    ``schema`` so that a bad argument becomes an Observation the model can act on, never an
    exception. ``metadata`` holds ``family``, ``specialty``, ``applicability`` and ``args_model``
    (the pydantic class), which :class:`~anomalyclaw.tools.registry.ToolRegistry` reads.
    """

    def call(config: RunnableConfig, **kwargs: Any) -> tuple[str, Observation]:
        start = time.perf_counter()
        try:
            ctx = context_from_config(config)
        except ToolArgumentError as exc:
            obs = Observation.failure(name, str(exc), args=kwargs)
            return obs.text, obs
        checked = (config.get("configurable") or {}).get(CHECKED_KEY)
        if not (isinstance(checked, CheckedCall) and checked.tool == name):
            checked = check_arguments(name, schema, (tool.metadata or {}).get("applicability"), ctx.item, kwargs)
        if isinstance(checked, Observation):
            obs = finish(checked, None, start)
        else:
            obs = run_checked(impl, ctx, checked)
        return obs.text, obs

    json_schema = args_json_schema(schema)
    json_schema["title"] = name
    json_schema["description"] = description
    tool = StructuredTool(name=name, description=description, args_schema=json_schema, func=call,
                          response_format="content_and_artifact",
                          metadata={"family": family, "specialty": specialty,
                                    "applicability": applicability, "args_model": schema})
    return tool
