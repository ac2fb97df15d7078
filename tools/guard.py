"""The one tool-call guard: applicability and argument validation, with one wording for the model.

Every path to a tool goes through :func:`check_arguments` exactly once: the registry's
:meth:`~anomalyclaw.tools.registry.ToolRegistry.check_call` (which also resolves the name) on
the graph's path, or the tool wrapper itself when a tool is invoked directly. What cannot run
becomes an :meth:`Observation.rejected <anomalyclaw.tools.observation.Observation.rejected>`
that says why, never an exception.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.items import Item

from .applicability import Applicability
from .observation import Observation


class ToolArgumentError(AnomalyClawError):
    """An argument the model passed cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class CheckedCall:
    """A call that passed the guard: the canonical tool name, its validated arguments, and what
    was repaired on the way (a tool name, ignored unknown arguments), for the observation."""

    tool: str
    args: BaseModel | dict[str, Any]
    """The validated pydantic arguments (a plain dict for a tool without an argument model)."""
    notes: tuple[str, ...] = ()
    repaired_from: str | None = None
    """The name the model used, when it was repaired to :attr:`tool`."""
    requested: dict[str, Any] | None = None
    """The arguments as asked for (before defaults), for traces."""

    def args_dict(self) -> dict[str, Any]:
        return self.args.model_dump() if isinstance(self.args, BaseModel) else dict(self.args)

    def to_state(self) -> dict[str, Any]:
        """Plain data for graph state (see :meth:`from_state`)."""
        # Only the arguments that were set: reading them back leaves the defaults unset, as the
        # guard saw them (tools note a clamped argument only when the model set it).
        args = self.args.model_dump(exclude_unset=True) if isinstance(self.args, BaseModel) else dict(self.args)
        return {"tool": self.tool, "args": args, "notes": list(self.notes),
                "repaired_from": self.repaired_from, "requested": self.requested}

    @classmethod
    def from_state(cls, state: dict[str, Any], schema: type[BaseModel] | None) -> "CheckedCall":
        """A checked call back from :meth:`to_state`: the arguments passed the guard as they
        are, so reading them into ``schema`` again cannot fail."""
        args = schema.model_validate(state["args"]) if schema is not None else dict(state["args"])
        return cls(state["tool"], args, tuple(state.get("notes") or ()), state.get("repaired_from"),
                   state.get("requested"))


def validation_message(exc: ValidationError, schema: type[BaseModel], tool: str = "") -> str:
    """A pydantic error as one line per bad field, plus the accepted arguments."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(arguments)"
        parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})")
    accepted = ", ".join(f"{name}: {f.description or f.annotation}"
                         for name, f in schema.model_fields.items())
    return f"invalid arguments{' for ' + tool if tool else ''}: " + "; ".join(parts) + f". Accepted arguments: {accepted}"


def not_applicable_message(tool: str, why: str) -> str:
    return f"{tool} does not apply to this item: {why}"


def check_arguments(tool: str, schema: type[BaseModel] | None, applicability: Applicability | None, item: Item,
                    raw_args: Any, *, notes: tuple[str, ...] = ()) -> CheckedCall | Observation:
    """Check that ``tool`` applies to ``item`` and that ``raw_args`` fit ``schema``.

    Unknown argument names are ignored (and noted); anything else that cannot run is returned
    as a rejected :class:`Observation` naming the problem and the fix.
    """
    record_args = dict(raw_args) if isinstance(raw_args, dict) else {"(raw)": repr(raw_args)}
    if raw_args is None:
        raw_args = {}
    if not isinstance(raw_args, dict):
        return Observation.rejected(tool, f"invalid arguments for {tool}: they must be a JSON object, got "
                                    f"{type(raw_args).__name__}", args=record_args)
    if applicability is not None:
        ok, why = applicability.check(item)
        if not ok:
            return Observation.rejected(tool, not_applicable_message(tool, why), args=record_args, applicable=False)
    if schema is None:
        return CheckedCall(tool, dict(raw_args), notes)
    ignored = sorted(set(raw_args) - set(schema.model_fields))
    try:
        args = schema.model_validate({k: v for k, v in raw_args.items() if k not in ignored})
    except ValidationError as exc:
        return Observation.rejected(tool, validation_message(exc, schema, tool), args=record_args)
    if ignored:
        notes = notes + (f"ignored unknown argument(s) {ignored}; accepted: {sorted(schema.model_fields)}",)
    return CheckedCall(tool, args, notes)


def clamp_arg(args: BaseModel, name: str, lo: float, hi: float, notes: list[str]) -> float:
    """``args.<name>`` clamped to [lo, hi]. When the caller set it explicitly and it changed, a
    note for the observation says so (a default that does not fit this item is adjusted silently)."""
    value = getattr(args, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolArgumentError(f"{name} must be a finite number in [{lo:g}, {hi:g}]; got {value!r}")
    clamped = min(max(value, lo), hi)
    if clamped != value and name in args.model_fields_set:
        notes.append(f"{name}={value:g} is outside [{lo:g}, {hi:g}]; used {clamped:g}")
    return type(value)(clamped) if isinstance(value, int) and not isinstance(value, bool) else clamped
