"""The refutation branch: propose -> select_tool -> observe -> refute -> ... -> commit.

One VLM call per turn (propose, then each refute); ``select_tool`` routes, validates and repairs
the model's tool choice without a VLM call; ``observe`` runs the LangChain tool; ``commit`` fixes
the final score and costs a VLM call only when the turn limit forces it.

The tool choice is a JSON action in the reply, or, with native tool calling
(:mod:`~anomalyclaw.graph.toolcalling`), the reply's tool call: the branch's requests carry the
item's applicable tools, a call naming no such tool or with arguments that are not a JSON object
becomes a rejected observation (the one guard, ``ToolRegistry.check_call``, checks the rest), and
the result goes back as a ``ToolMessage`` plus a user message with the tool's images. ``propose``
fixes the item's mode (``state["tool_calling"]``) so that one conversation never mixes the two.
"""
from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from anomalyclaw.tools.guard import CheckedCall
from anomalyclaw.tools.observation import Observation

from .calls import TurnResult, ask
from .context import RunContext, arun_context
from .messages import (NATIVE_OBSERVATION, first_refute_messages, observation_message, reply_message,
                       tool_result_messages, unanswered_tool_calls)
from .replies import CommitReply, ProposeReply, RefuteReply, reply_format
from .state import RefuteState

OPEN = ("open", "uncertain")


def _open(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in candidates if c.get("status") in OPEN]


def apply_verdicts(candidates: list[dict[str, Any]], replied: Any, turn_no: int, tool: Any) -> list[dict[str, Any]]:
    """Set each replied verdict's status and evidence on its candidate (in place; verdicts
    about ids that are not candidates are dropped) and return the history's verdict rows."""
    rows = []
    for v in replied:
        for c in candidates:
            if c["id"] == v.id:
                c["status"], c["evidence"] = v.status, v.evidence
                rows.append({"turn": turn_no, "id": v.id, "status": v.status, "evidence": v.evidence, "tool": tool})
    return rows


def _action_dict(action: Any, turn: TurnResult | None = None) -> dict[str, Any]:
    if action.commit or not action.tool:
        return {"commit": True}
    out = {"tool": action.tool, "args": dict(action.args), "candidate": action.candidate}
    call = turn.tool_call if turn is not None else None
    if call is not None:  # native: the call's id (for its ToolMessage) and why its arguments were unusable
        out["call_id"] = call["id"]
        if call.get("error"):
            out["args_error"] = call["error"]
    return out


def _native(state: RefuteState) -> bool:
    return state.get("tool_calling") == "native"


def _tools(run: RunContext, native: bool) -> list[dict[str, Any]] | None:
    return run.tool_schemas() if native else None


def _reply(turn: TurnResult, native: bool):
    """The model's reply as the conversation keeps it (with the tool call acted on, if native)."""
    return reply_message(turn.text, tool_call=turn.tool_call if native else None, message_id=turn.message_id)


async def propose(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = await arun_context(runtime.context, state)
    native = run.tool_calling.native()
    messages = first_refute_messages(run, native=native)
    turn = await ask(run, messages, "propose", tools=_tools(run, native))
    notes: list[str] = []
    if turn.tools_unsupported and run.tool_calling.mode == "auto":
        run.tool_calling.fall_back(turn.tools_unsupported)
        notes.append(f"tool calling auto: JSON actions instead of native tool calls ({turn.tools_unsupported[:200]})")
        native = False
        messages = first_refute_messages(run)
        turn = await ask(run, messages, "propose")
    update: dict[str, Any] = {"messages": messages, "turn": 1, "calls": turn.calls,
                              "fallbacks": notes + turn.fallbacks, "candidates": [], "pending": {"commit": True},
                              "score": None, "initial_score": None, "tool_calling": "native" if native else "json"}
    if turn.parsed is None:
        update["fallbacks"] = notes + turn.fallbacks + [f"propose failed: {turn.error}"]
        update["history"] = [{"turn": 1, "stage": "propose", "error": turn.error, "reply": turn.text[:2000]}]
        return update
    reply: ProposeReply = turn.parsed  # type: ignore[assignment]
    candidates = [{"id": c.id, "description": c.description, "bbox": c.bbox, "status": "open", "evidence": ""}
                  for c in reply.candidates]
    pending = _action_dict(reply.action, turn)
    update.update(messages=messages + [_reply(turn, native)], candidates=candidates, pending=pending,
                  score=reply.initial_score, initial_score=reply.initial_score,
                  history=[{"turn": 1, "stage": "propose", "anomaly_score": reply.initial_score,
                            "candidates": candidates, "action": pending, "rationale": reply.rationale}])
    return update


async def select_tool(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Route to ``observe`` or ``commit``; check the tool call with the registry's guard (name
    repair, applicability, arguments) without a VLM call. A call that cannot run still goes to
    ``observe``, as an observation that tells the model why.

    A coroutine, as is :func:`_route`, though neither does CPU work worth a thread: LangGraph
    runs a plain-function node or edge in a thread of the event loop's executor, which cost two
    thread hops per turn for a few dictionary lookups (each hop wakes the loop)."""
    run = await arun_context(runtime.context, state)
    pending = state.get("pending") or {"commit": True}
    if pending.get("commit"):
        return {"route": "commit", "forced": False, "call": None}
    if not _open(state.get("candidates", [])):
        return {"route": "commit", "forced": False, "call": None,
                "fallbacks": ["select_tool: no open candidate left; committed instead of calling a tool"]}
    if state.get("turn", 0) >= run.config.max_turns:
        return {"route": "commit", "forced": True, "call": None}
    asked = str(pending.get("tool") or "")
    candidate = _find(state.get("candidates", []), pending.get("candidate"))
    cid = (candidate or {}).get("id") or pending.get("candidate")
    native = {"call_id": pending["call_id"]} if pending.get("call_id") else {}
    if pending.get("args_error"):
        why = (f"the arguments of the {asked} call are {pending['args_error']}; send a JSON object that fits "
               "the tool's schema")
        rejected = Observation.rejected(asked, why, args={}).to_state()
        return {"route": "observe", "call": {"tool": asked, "candidate": cid, "rejected": rejected, **native}}
    checked = run.registry.check_call(asked, dict(pending.get("args") or {}), run.item,
                                      default_bbox=(candidate or {}).get("bbox"))
    if isinstance(checked, Observation):
        return {"route": "observe",
                "call": {"tool": checked.tool, "candidate": cid, "rejected": checked.to_state(), **native}}
    return {"route": "observe", "call": {**checked.to_state(), "candidate": cid, **native}}


def _find(candidates: list[dict[str, Any]], cid: Any) -> dict[str, Any] | None:
    for c in candidates:
        if c.get("id") == cid:
            return c
    opened = _open(candidates)
    return opened[0] if opened else None


async def observe(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Run the checked call through the LangChain tool (or report why it could not run)."""
    run = await arun_context(runtime.context, state)
    call = state.get("call") or {}
    if "rejected" in call:
        obs = call["rejected"]
        return {"observations": [obs], "fallbacks": [f"turn {state.get('turn')}: {obs['error'][:200]}"]}
    checked = CheckedCall.from_state(call, run.registry.args_model(call["tool"]))
    obs = (await run.registry.arun_checked(checked, run.item_context)).to_state()
    fallbacks = [f"tool name {checked.repaired_from!r} repaired to {checked.tool!r}"] if checked.repaired_from else []
    return {"observations": [obs], "tools_used": [obs["tool"]], "fallbacks": fallbacks}


async def refute(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = await arun_context(runtime.context, state)
    observations = state["observations"]
    obs = observations[-1]
    call = state.get("call") or {}
    turn_no = state.get("turn", 1) + 1
    left = run.config.max_turns - turn_no
    candidates = [dict(c) for c in state.get("candidates", [])]
    open_list = "; ".join(f"{c['id']}: {c['description']}" + (f" bbox {c['bbox']}" if c.get("bbox") else "")
                          for c in _open(candidates)) or "none"
    native = _native(state)
    last_turn = "call no tool" if native else 'set "action" to {"commit": true}'
    turns_note = (f"You have {left} more turn(s) after this one." if left > 0
                  else f"This is your last turn: {last_turn}.")
    call_id = call.get("call_id")
    text = run.prompts.render("refute", tool=obs["tool"], turn=turn_no - 1, candidate=call.get("candidate") or "-",
                              observation=NATIVE_OBSERVATION if call_id else obs["text"], open_candidates=open_list,
                              turns_note=turns_note, format=reply_format("refute", native))
    if call_id:
        sent = tool_result_messages(call_id, obs["tool"], obs["text"], text, obs["images"])
    else:
        sent = [observation_message(text, obs["images"])]
    turn = await ask(run, list(state["messages"]) + sent, "refute", observations, tools=_tools(run, native))
    row: dict[str, Any] = {"turn": turn_no, "stage": "refute", "tool": obs["tool"],
                           "args": call.get("requested", call.get("args")),
                           "candidate": call.get("candidate"), "observation": obs["text"], "obs_ok": obs["ok"],
                           "obs_error": obs["error"], "obs_data": obs["data"]}
    if turn.parsed is None:
        row.update(error=turn.error, reply=turn.text[:2000])
        return {"messages": sent, "turn": turn_no, "calls": turn.calls, "history": [row],
                "fallbacks": turn.fallbacks + [f"refute failed: {turn.error}"], "pending": {"commit": True}}
    reply: RefuteReply = turn.parsed  # type: ignore[assignment]
    verdicts = apply_verdicts(candidates, reply.verdicts, turn_no, obs["tool"])
    pending = _action_dict(reply.action, turn)
    row.update(anomaly_score=reply.updated_score, verdicts=verdicts, action=pending, rationale=reply.rationale)
    return {"messages": sent + [_reply(turn, native)], "turn": turn_no, "calls": turn.calls,
            "fallbacks": turn.fallbacks, "candidates": candidates, "verdicts": verdicts, "pending": pending,
            "score": reply.updated_score, "history": [row]}


def _summary(state: RefuteState) -> str:
    lines = [f"- {c['id']} ({c.get('status')}): {c.get('description')}"
             + (f" — {c['evidence']}" if c.get("evidence") else "") for c in state.get("candidates", [])]
    score = state.get("score")
    lines.append(f"Your latest score: {score:.2f}" if isinstance(score, float) else "No score yet.")
    return "\n".join(lines) or "No candidates."


async def commit(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Fix the final score: the model's latest one, or a forced final call at the turn limit
    (also when no usable score exists yet)."""
    run = await arun_context(runtime.context, state)
    score = state.get("score")
    if not state.get("forced") and score is not None:
        return {"refute_score": score, "refute_rationale": (state.get("history") or [{}])[-1].get("rationale", "")}
    native = _native(state)
    messages = list(state.get("messages", []))
    # A tool the model asked for on its last turn is not run: its call still needs an answer.
    unanswered = unanswered_tool_calls(messages, "Not run: the turn limit is reached; commit now.")
    human = HumanMessage(content=run.prompts.render("commit", summary=_summary(state),
                                                    format=reply_format("commit", native)))
    turn = await ask(run, messages + unanswered + [human], "commit", state.get("observations", []),
                     tools=_tools(run, native))
    row = {"turn": state.get("turn", 0) + 1, "stage": "commit", "forced": True}
    if turn.parsed is None:
        row.update(error=turn.error, reply=turn.text[:2000])
        update = {"calls": turn.calls, "history": [row], "fallbacks": turn.fallbacks}
        if score is not None:
            update.update(refute_score=score, fallbacks=turn.fallbacks + [
                f"forced commit failed ({turn.error}); kept the latest score"])
        else:
            update["refute_error"] = f"refutation branch produced no score: {turn.error}"
        return update
    reply: CommitReply = turn.parsed  # type: ignore[assignment]
    row.update(anomaly_score=reply.anomaly_score, confidence=reply.confidence, rationale=reply.rationale)
    return {"messages": [*unanswered, human, reply_message(turn.text, message_id=turn.message_id)],
            "calls": turn.calls, "fallbacks": turn.fallbacks, "history": [row], "refute_score": reply.anomaly_score, "refute_confidence": reply.confidence,
            "refute_rationale": reply.rationale}


async def _route(state: RefuteState) -> str:
    return state.get("route", "commit")


def add_refutation_nodes(graph: StateGraph, *, propose: Any = propose, refute: Any = refute,
                         commit: Any = commit) -> None:
    """Wire the branch into ``graph`` (its own graph, or the pipeline's). The multiple-choice
    task passes its own propose, refute and commit nodes (``graph.mcqa``); the wiring, the tool
    guard and the tools are the same."""
    graph.add_node("propose", propose)
    graph.add_node("select_tool", select_tool)
    graph.add_node("observe", observe)
    graph.add_node("refute", refute)
    graph.add_node("commit", commit)
    graph.add_edge("propose", "select_tool")
    graph.add_conditional_edges("select_tool", _route, {"observe": "observe", "commit": "commit"})
    graph.add_edge("observe", "refute")
    graph.add_edge("refute", "select_tool")


def build_refutation_graph(*, checkpointer: Any = None, name: str = "refutation", context_schema: type = RunContext,
                           input_schema: type | None = None):
    """The refutation branch as a compiled LangGraph; run it with ``context=make_context(...)``."""
    graph = StateGraph(RefuteState, context_schema=context_schema, input_schema=input_schema)
    add_refutation_nodes(graph)
    graph.add_edge(START, "propose")
    graph.add_edge("commit", END)
    return graph.compile(checkpointer=checkpointer, name=name)
