"""The messages each VLM call sends: first turns with references and query, observations with
their images, and the image-history policy that keeps later requests small.

With native tool calling a tool's result goes back as a ``ToolMessage`` holding its text,
followed by a user message with the refute prompt and the tool's images (the OpenAI API and
vLLM refuse images inside tool messages)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from anomalyclaw.imaging import encode_image, to_data_url

from .context import RunContext
from .images import image_block, text_block
from .replies import FORMATS, reply_format

#: What replaces an image already sent earlier in the conversation (``image_history="once"``).
IMAGE_STUB = "[image sent earlier in this conversation]"
#: The refute prompt's ``$observation`` with native tool calling: the text is in the tool message.
NATIVE_OBSERVATION = "(the tool's result is the tool message above; its images, if any, follow here)"


def shown_reference_indices(run: RunContext) -> list[int]:
    """The references the VLM sees: the closest ones to the query first, ``n_refs_shown`` of them."""
    ctx = run.item_context
    n = ctx.n_references
    if n == 0:
        return []
    k = min(n, run.config.n_refs_shown)
    try:
        order = [i for i, _ in ctx.reference_ranking()]
    except Exception:  # ranking needs the images; the caller reports load errors itself
        order = list(range(n))
    return order[:k]


def image_blocks(run: RunContext) -> list[dict[str, Any]]:
    """Labelled reference images, then the query last (as the paper shows them)."""
    ctx, cfg = run.item_context, run.config
    blocks: list[dict[str, Any]] = []
    shown = shown_reference_indices(run)
    for rank, i in enumerate(shown, 1):
        path = ctx.item.ref_paths[i]
        label = "Reference (the earlier image of the same place):" if "bi_temporal" in ctx.traits \
            else f"Reference {rank} (normal):"
        blocks.append(text_block(label))
        blocks.append(image_block(run.encoder.data_url(("ref", str(path)), lambda i=i: ctx.reference(i),
                                                       max_side=cfg.reference_side, fmt=cfg.image_format)))
    blocks.append(text_block("QUERY:"))
    # The query is shown once per branch and never again after this item: the item keeps its
    # URL and leaves the shared cache to the references, which other items reuse.
    url = ctx.item_cached(("query_url", cfg.image_side, cfg.image_format), lambda: to_data_url(
        encode_image(ctx.query_full, cfg.image_format, max_side=cfg.image_side)))
    blocks.append(image_block(url))
    return blocks


def warm_images(run: RunContext) -> int:
    """Rank the references and encode the images the first messages show, so that the graph's
    nodes (on the event loop) find them in the encoder's cache; returns how many were encoded or
    found. Call it from a worker thread: decoding, ranking and JPEG encoding are the CPU work."""
    return sum(1 for b in image_blocks(run) if b.get("type") == "image_url")


def descriptor(run: RunContext) -> str:
    """The generic task descriptor of the direct branch, from the domain card."""
    card = run.item_context.card
    cat = run.item.category
    what = f"{card.name}" + (f" ({cat})" if cat and cat not in card.name else "")
    return f"{card.modality} images of {what}. Normal: {card.normal}. Anomalous: {card.anomaly}."


def first_refute_messages(run: RunContext, *, native: bool = False) -> list[BaseMessage]:
    """System prompt and the propose turn's user message (``native``: the tool list without
    argument schemas, which travel as function schemas, and the native reply format)."""
    p, cfg, ctx = run.prompts, run.config, run.item_context
    n_shown = len(shown_reference_indices(run))
    note = ""
    if ctx.n_references > n_shown:
        note = f" (the {n_shown} closest of {ctx.n_references}; tools use all of them)"
    text = p.render("propose", domain_card=ctx.card.describe(ctx.item.category), n_refs=n_shown,
                    reference_note=note, tools=run.registry.render(ctx.item, args=not native),
                    max_turns=cfg.max_turns, max_candidates=cfg.max_candidates,
                    format=reply_format("propose", native))
    return [SystemMessage(p.render("refute_system")), HumanMessage(content=[text_block(text), *image_blocks(run)])]


def direct_messages(run: RunContext, *, logprob: bool = False) -> list[BaseMessage]:
    p = run.prompts
    text = p.render("direct_logprob" if logprob else "direct", descriptor=descriptor(run),
                    n_refs=len(shown_reference_indices(run)), format=FORMATS["direct"])
    return [SystemMessage(p.render("direct_system")), HumanMessage(content=[text_block(text), *image_blocks(run)])]


def first_mcq_messages(run: RunContext) -> list[BaseMessage]:
    """The multiple-choice task's system prompt and propose turn: the question and its options
    (the candidates the refutation tests), the tools, then the images."""
    p, cfg, ctx, q = run.prompts, run.config, run.item_context, _question(run)
    n_shown = len(shown_reference_indices(run))
    note = f" (the {n_shown} closest of {ctx.n_references}; tools use all of them)" if ctx.n_references > n_shown else ""
    text = p.render("mcq_propose", domain_card=ctx.card.describe(ctx.item.category), n_refs=n_shown,
                    reference_note=note, question=q.text, options=q.render_options(),
                    tools=run.registry.render(ctx.item), max_turns=cfg.max_turns, format=FORMATS["mcq_propose"])
    return [SystemMessage(p.render("mcq_system")), HumanMessage(content=[text_block(text), *image_blocks(run)])]


def mcq_direct_messages(run: RunContext) -> list[BaseMessage]:
    """The fair baseline: the card, the normal samples and the query, then the question with its
    options and a request for the letter only."""
    p, ctx, q = run.prompts, run.item_context, _question(run)
    intro = p.render("mcq_direct", domain_card=ctx.card.describe(ctx.item.category),
                     n_refs=len(shown_reference_indices(run)))
    asked = p.render("mcq_question", question=q.text, options=q.render_options(), format=FORMATS["mcq_direct"])
    return [SystemMessage(p.render("mcq_direct_system")),
            HumanMessage(content=[text_block(intro), *image_blocks(run), text_block(asked)])]


def _question(run: RunContext):
    if run.question is None:
        raise ValueError("the multiple-choice task needs a question in the run context (make_context(question=...))")
    return run.question


def observation_message(text: str, images: Sequence[Mapping[str, Any]]) -> HumanMessage:
    """A user message with the refute prompt and the tool's images (``Observation.to_state()``
    images: ``name``, ``caption`` and encoded ``data``)."""
    blocks: list[dict[str, Any]] = [text_block(text)]
    for im in images:
        blocks.append(text_block(f"{im['name']}: {im['caption']}"))
        blocks.append(image_block(to_data_url(im["data"])))
    return HumanMessage(content=blocks)


def tool_result_messages(call_id: str, tool: str, result: str, prompt: str,
                         images: Sequence[Mapping[str, Any]]) -> list[BaseMessage]:
    """A native tool call's answer: the ``ToolMessage`` with the tool's text, then the user
    message with the refute prompt and the tool's images."""
    return [ToolMessage(content=result, tool_call_id=call_id, name=tool), observation_message(prompt, images)]


def unanswered_tool_calls(messages: Sequence[BaseMessage], why: str) -> list[ToolMessage]:
    """Tool messages for the tool calls of the last reply that were not run (every call of an
    assistant message must be answered before the next user message)."""
    last = messages[-1] if messages else None
    if not isinstance(last, AIMessage):
        return []
    return [ToolMessage(content=why, tool_call_id=tc["id"], name=tc["name"]) for tc in last.tool_calls]


def visible(messages: Sequence[BaseMessage], policy: str) -> list[BaseMessage]:
    """The messages as one request carries them.

    ``"all"`` resends every image each turn (what a stateless chat API needs by default);
    ``"once"`` keeps the images of the latest user message only and replaces earlier ones with a
    stub, so each image crosses the wire once per conversation.
    """
    if policy == "all":
        return list(messages)
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        if isinstance(m, HumanMessage) and i != last_user and isinstance(m.content, list):
            blocks = [b if not (isinstance(b, dict) and b.get("type") == "image_url") else text_block(IMAGE_STUB)
                      for b in m.content]
            out.append(HumanMessage(content=blocks))
        else:
            out.append(m)
    return out


def reply_message(text: str, *, tool_call: Mapping[str, Any] | None = None, message_id: str | None = None) -> AIMessage:
    """The model's reply as the conversation keeps it: its text, and the one tool call the graph
    acts on (native tool calling; arguments that were not a JSON object are kept as ``{}``).
    ``message_id`` (the chat model's) keeps LangGraph's message stream from showing it twice."""
    calls = []
    if tool_call is not None:
        calls = [{"name": tool_call["name"], "args": tool_call.get("args") or {}, "id": tool_call["id"],
                  "type": "tool_call"}]
    return AIMessage(content=text, tool_calls=calls, id=message_id)
