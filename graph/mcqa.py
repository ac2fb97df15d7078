"""The multiple-choice task (``--task mcqa``): the same graphs answering one question per run.

The pipeline keeps its shape and node names; only the stages' prompts and reply models change:

* ``direct``: one VLM call that answers with the option's letter only (MMAD's "fair baseline");
* ``propose``: the question and its options go into the first refutation turn; the options are
  the branch's candidates, and the model gives a tentative answer and a tool call, or commits;
* ``select_tool`` and ``observe``: the score task's own nodes (the tool guard, the tools);
* ``refute``: verdicts on the options the observation tested, and the current answer;
* ``commit``: the latest answer, or a forced final call (turn limit, or no answer yet) that gives
  the letter and, where the model gives them, per-option confidences (``option_scores``);
* ``fuse``: nothing to blend; it gathers both branches' letters into ``mcq_answer``.

Every question is its own run with its own :class:`RunContext`; the questions about one image
share one ``ItemContext``, so the image is decoded, ranked, encoded and scored by the experts
once for all of them.
"""
from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import StateGraph
from langgraph.runtime import Runtime

from .calls import ask
from .context import RunContext
from .messages import first_mcq_messages, mcq_direct_messages, observation_message, reply_message
from .refutation import _action_dict, _open, add_refutation_nodes, apply_verdicts
from .replies import FORMATS, McqCommitReply, McqDirectReply, McqProposeReply, McqRefuteReply
from .state import DirectState, PipelineState, RefuteState


async def mcq_direct(state: DirectState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """One call, one letter."""
    run = runtime.context
    turn = await ask(run, mcq_direct_messages(run), "mcq_direct")
    update: dict[str, Any] = {"direct_calls": turn.calls, "direct_fallbacks": turn.fallbacks}
    if turn.parsed is None:
        update.update(direct_answer=None, direct_reply={"raw": turn.text[:2000]},
                      direct_error=f"direct branch gave no option letter: {turn.error}")
        return update
    reply: McqDirectReply = turn.parsed  # type: ignore[assignment]
    update.update(direct_answer=reply.answer, direct_reply={"answer": reply.answer, "text": turn.text[:2000]})
    return update


async def mcq_propose(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = runtime.context
    question = run.question
    messages = first_mcq_messages(run)
    candidates = [{"id": letter, "description": text, "bbox": None, "status": "open", "evidence": ""}
                  for letter, text in question.options]
    turn = await ask(run, messages, "mcq_propose")
    update: dict[str, Any] = {"messages": messages, "turn": 1, "calls": turn.calls, "fallbacks": turn.fallbacks,
                              "candidates": candidates, "pending": {"commit": True}, "answer": None,
                              "option_scores": None}
    if turn.parsed is None:
        update["fallbacks"] = turn.fallbacks + [f"propose failed: {turn.error}"]
        update["history"] = [{"turn": 1, "stage": "propose", "error": turn.error, "reply": turn.text[:2000]}]
        return update
    reply: McqProposeReply = turn.parsed  # type: ignore[assignment]
    pending = _action_dict(reply.action)
    update.update(messages=messages + [reply_message(turn.text)], pending=pending, answer=reply.answer,
                  option_scores=reply.option_scores,
                  history=[{"turn": 1, "stage": "propose", "answer": reply.answer, "option_scores": reply.option_scores,
                            "candidates": candidates, "action": pending, "rationale": reply.rationale}])
    return update


async def mcq_refute(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    run = runtime.context
    observations = state["observations"]
    obs = observations[-1]
    call = state.get("call") or {}
    turn_no = state.get("turn", 1) + 1
    left = run.config.max_turns - turn_no
    candidates = [dict(c) for c in state.get("candidates", [])]
    open_list = "; ".join(f"{c['id']}. {c['description']}" for c in _open(candidates)) or "none"
    turns_note = (f"You have {left} more turn(s) after this one." if left > 0
                  else 'This is your last turn: set "action" to {"commit": true}.')
    text = run.prompts.render("mcq_refute", tool=obs["tool"], turn=turn_no - 1, candidate=call.get("candidate") or "-",
                              observation=obs["text"], question=run.question.text, open_options=open_list,
                              turns_note=turns_note, format=FORMATS["mcq_refute"])
    human = observation_message(text, obs["images"])
    turn = await ask(run, list(state["messages"]) + [human], "mcq_refute", observations)
    row: dict[str, Any] = {"turn": turn_no, "stage": "refute", "tool": obs["tool"],
                           "args": call.get("requested", call.get("args")), "candidate": call.get("candidate"),
                           "observation": obs["text"], "obs_ok": obs["ok"], "obs_error": obs["error"],
                           "obs_data": obs["data"]}
    if turn.parsed is None:
        row.update(error=turn.error, reply=turn.text[:2000])
        return {"messages": [human], "turn": turn_no, "calls": turn.calls, "history": [row],
                "fallbacks": turn.fallbacks + [f"refute failed: {turn.error}"], "pending": {"commit": True}}
    reply: McqRefuteReply = turn.parsed  # type: ignore[assignment]
    verdicts = apply_verdicts(candidates, reply.verdicts, turn_no, obs["tool"])
    pending = _action_dict(reply.action)
    answer = reply.answer or state.get("answer")
    scores = reply.option_scores or state.get("option_scores")
    row.update(answer=answer, option_scores=scores, verdicts=verdicts, action=pending, rationale=reply.rationale)
    return {"messages": [human, reply_message(turn.text)], "turn": turn_no, "calls": turn.calls,
            "fallbacks": turn.fallbacks, "candidates": candidates, "verdicts": verdicts, "pending": pending,
            "answer": answer, "option_scores": scores, "history": [row]}


def _summary(state: RefuteState) -> str:
    lines = [f"- option {c['id']} ({c.get('status')}): {c.get('description')}"
             + (f" — {c['evidence']}" if c.get("evidence") else "") for c in state.get("candidates", [])]
    answer = state.get("answer")
    lines.append(f"Your latest answer: {answer}" if answer else "No answer yet.")
    return "\n".join(lines)


async def mcq_commit(state: RefuteState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Fix the answer: the model's latest, or a forced final call at the turn limit (also when it
    has given no answer yet)."""
    run = runtime.context
    answer = state.get("answer")
    if not state.get("forced") and answer is not None:
        return {"refute_answer": answer, "refute_option_scores": state.get("option_scores"),
                "refute_rationale": (state.get("history") or [{}])[-1].get("rationale", "")}
    q = run.question
    human = HumanMessage(content=run.prompts.render("mcq_commit", summary=_summary(state), question=q.text,
                                                    options=q.render_options(), format=FORMATS["mcq_commit"]))
    turn = await ask(run, list(state.get("messages", [])) + [human], "mcq_commit", state.get("observations", []))
    row: dict[str, Any] = {"turn": state.get("turn", 0) + 1, "stage": "commit", "forced": True}
    if turn.parsed is None:
        row.update(error=turn.error, reply=turn.text[:2000])
        update: dict[str, Any] = {"calls": turn.calls, "history": [row], "fallbacks": turn.fallbacks}
        if answer is not None:
            update.update(refute_answer=answer, refute_option_scores=state.get("option_scores"),
                          fallbacks=turn.fallbacks + [f"forced commit failed ({turn.error}); kept the latest answer"])
        else:
            update["refute_error"] = f"refutation branch gave no option letter: {turn.error}"
        return update
    reply: McqCommitReply = turn.parsed  # type: ignore[assignment]
    row.update(answer=reply.answer, option_scores=reply.option_scores, rationale=reply.rationale)
    return {"messages": [human, reply_message(turn.text)], "calls": turn.calls, "fallbacks": turn.fallbacks,
            "history": [row], "refute_answer": reply.answer, "refute_option_scores": reply.option_scores,
            "refute_rationale": reply.rationale}


async def mcq_fuse(state: PipelineState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Both branches' letters side by side (an MCQ answer is not blended)."""
    return {"mcq_answer": {"direct": state.get("direct_answer"), "refute": state.get("refute_answer")}}


def add_mcqa_nodes(graph: StateGraph) -> None:
    """The pipeline's nodes for the multiple-choice task, under the score task's node names."""
    graph.add_node("direct", mcq_direct)
    add_refutation_nodes(graph, propose=mcq_propose, refute=mcq_refute, commit=mcq_commit)
    graph.add_node("fuse", mcq_fuse)
