"""The one VLM reply parser: tolerant JSON extraction and a validated model per stage.

Models answer in JSON inside free text (code fences, prose around it, trailing commas, Python
literals, pixel instead of normalized boxes, percent instead of unit scores). Everything that
can be read unambiguously is read; anything else raises :class:`ReplyError` whose message is
what the repair retry tells the model.
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

#: Each stage's reply format as the prompts and the repair prompt spell it (``$format``).
FORMATS = {
    "propose": '{"initial_score": <0..1>, "candidates": [{"id": "c1", "description": "...", "bbox": '
               '[x0, y0, x1, y1] or null}], "action": {"tool": "<tool name>", "args": {...}, '
               '"candidate": "c1"} or {"commit": true}, "rationale": "..."}',
    "refute": '{"verdicts": [{"id": "c1", "status": "refuted" | "confirmed" | "uncertain", "evidence": '
              '"..."}], "updated_score": <0..1>, "action": {"tool": "<tool name>", "args": {...}, '
              '"candidate": "c1"} or {"commit": true}, "rationale": "..."}',
    "commit": '{"anomaly_score": <0..1>, "confidence": <0..100>, "rationale": "..."}',
    "direct": '{"image_label": "normal" | "anomalous", "confidence": <0..1, how sure you are of the label>, '
              '"anomaly_type": <short string or null>, "evidence": "...", "bbox": [x0, y0, x1, y1] or null}',
    # The multiple-choice task (``--task mcqa``): the direct branch answers with a letter only,
    # the refutation branch tests the options (its candidates) with tools in JSON turns.
    "mcq_direct": "the letter of one option (for example B) and nothing else",
    "mcq_propose": '{"answer": "<letter>" or null, "option_scores": {"A": <0..1>, ...} or null, "action": '
                   '{"tool": "<tool name>", "args": {...}, "candidate": "<letter>"} or {"commit": true}, '
                   '"rationale": "..."}',
    "mcq_refute": '{"verdicts": [{"id": "<letter>", "status": "refuted" | "confirmed" | "uncertain", '
                  '"evidence": "..."}], "answer": "<letter>" or null, "option_scores": {"A": <0..1>, ...} or '
                  'null, "action": {"tool": "<tool name>", "args": {...}, "candidate": "<letter>"} or '
                  '{"commit": true}, "rationale": "..."}',
    "mcq_commit": '{"answer": "<letter>", "option_scores": {"A": <0..1>, ...} or null, "rationale": "..."}',
}
#: Stages whose reply is a bare option letter, not JSON (their repair prompt says so).
LETTER_STAGES = frozenset({"mcq_direct"})
#: Stages of the multiple-choice task (their parser needs the question's options).
MCQ_STAGES = frozenset({"mcq_direct", "mcq_propose", "mcq_refute", "mcq_commit"})

#: The same formats with native tool calling (``AgentConfig.tool_calling``): the next action is a
#: tool call beside the JSON text (no call: commit), and the text names the candidate it tests.
NATIVE_FORMATS = {
    **FORMATS,
    "propose": '{"initial_score": <0..1>, "candidates": [{"id": "c1", "description": "...", "bbox": '
               '[x0, y0, x1, y1] or null}], "candidate": "<id of the candidate your tool call tests>" or null, '
               '"rationale": "..."} as the message text, with at most one tool call to test a candidate '
               '(no tool call: commit)',
    "refute": '{"verdicts": [{"id": "c1", "status": "refuted" | "confirmed" | "uncertain", "evidence": '
              '"..."}], "updated_score": <0..1>, "candidate": "<id of the candidate your tool call tests>" or '
              'null, "rationale": "..."} as the message text, with at most one tool call to test a candidate '
              '(no tool call: commit)',
}


def reply_format(stage: str, native: bool = False) -> str:
    """The ``$format`` text of ``stage`` (:data:`NATIVE_FORMATS` when tools are called natively)."""
    return (NATIVE_FORMATS if native else FORMATS)[stage]


# ------------------------------------------------------------------------ writing replies
# The same shapes as JSON text, for backends that answer without a model (the offline policy,
# the test server): one spelling of every key, beside the parser that reads them.

#: The action that ends the refutation.
COMMIT: dict[str, Any] = {"commit": True}


def tool_action(tool: str, args: dict[str, Any], candidate: str | None) -> dict[str, Any]:
    """The action that calls ``tool`` on ``candidate``."""
    return {"tool": tool, "args": args, "candidate": candidate}


def propose_reply(initial_score: float, candidates: list[dict[str, Any]], action: dict[str, Any],
                  rationale: str) -> str:
    """A propose reply; candidates are ``{"id", "description", "bbox"}``."""
    return json.dumps({"initial_score": initial_score, "candidates": candidates, "action": action,
                       "rationale": rationale})


def refute_reply(verdicts: list[dict[str, Any]], updated_score: float, action: dict[str, Any], rationale: str) -> str:
    """A refute reply; verdicts are ``{"id", "status", "evidence"}``."""
    return json.dumps({"verdicts": verdicts, "updated_score": updated_score, "action": action, "rationale": rationale})


def commit_reply(anomaly_score: float, confidence: float, rationale: str) -> str:
    return json.dumps({"anomaly_score": anomaly_score, "confidence": confidence, "rationale": rationale})


def direct_reply(image_label: str, confidence: float, anomaly_type: str | None, evidence: str,
                 bbox: list[float] | None) -> str:
    return json.dumps({"image_label": image_label, "confidence": confidence, "anomaly_type": anomaly_type,
                       "evidence": evidence, "bbox": bbox})


def mcq_propose_reply(answer: str | None, action: dict[str, Any], rationale: str,
                      option_scores: dict[str, float] | None = None) -> str:
    return json.dumps({"answer": answer, "option_scores": option_scores, "action": action, "rationale": rationale})


def mcq_refute_reply(verdicts: list[dict[str, Any]], answer: str | None, action: dict[str, Any], rationale: str,
                     option_scores: dict[str, float] | None = None) -> str:
    return json.dumps({"verdicts": verdicts, "answer": answer, "option_scores": option_scores, "action": action,
                       "rationale": rationale})


def mcq_commit_reply(answer: str, rationale: str, option_scores: dict[str, float] | None = None) -> str:
    return json.dumps({"answer": answer, "option_scores": option_scores, "rationale": rationale})




def native_reply(text: str) -> tuple[str, list[dict[str, Any]]]:
    """A JSON-action reply as a model with native tool calling gives it: (content without the
    ``action`` key but with the tested ``candidate``, tool calls ``[{"name", "arguments"}]`` with
    the arguments as a JSON string). Text that is not such a reply comes back unchanged."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return text, []
    if not isinstance(obj, dict) or "action" not in obj:
        return text, []
    action = obj.pop("action")
    calls: list[dict[str, Any]] = []
    if isinstance(action, dict) and action.get("tool") and not action.get("commit"):
        obj["candidate"] = action.get("candidate")
        calls.append({"name": action["tool"], "arguments": json.dumps(action.get("args") or {})})
    return json.dumps(obj), calls


Stage = Literal["propose", "refute", "commit", "direct", "mcq_direct", "mcq_propose", "mcq_refute", "mcq_commit"]


class ReplyError(ValueError):
    """A reply that cannot be used; the message says why in words the model can act on."""


# ------------------------------------------------------------------------------- JSON extraction
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
#: Tags reasoning models wrap their thinking in (DeepSeek-R1, Qwen3, QwQ ...).
_REASONING_TAGS = "think|thinking|reasoning|thought"
_REASONING_BLOCK = re.compile(rf"<({_REASONING_TAGS})\b[^>]*>.*?</\1\s*>", re.S | re.I)
_REASONING_CLOSE = re.compile(rf"</(?:{_REASONING_TAGS})\s*>", re.I)
_REASONING_OPEN = re.compile(rf"<(?:{_REASONING_TAGS})\b[^>]*>", re.I)
#: The characters the object scanner stops at (everything else is skipped in one regex step).
_SPECIAL = re.compile(r"""[{}"'\\\n]""")
#: Python-literal parsing (single quotes, None/True) is tried only on objects up to this size:
#: ``ast`` on megabytes of hostile text costs seconds and gigabytes.
_LITERAL_MAX_CHARS = 100_000
#: The longest reply text kept in the conversation and the records; a model reply is a few
#: thousand characters (``max_tokens``), anything longer is cut.
MAX_REPLY_CHARS = 16_000
#: The longest text field (rationale, evidence, description) kept from a parsed reply.
MAX_FIELD_CHARS = 4_000


def strip_reasoning(text: str) -> str:
    """``text`` without reasoning: ``<think>...</think>`` blocks (and ``thinking``,
    ``reasoning``, ``thought``), everything before a lone closing tag (servers whose chat
    template opens the block in the prompt), and everything after an opening tag that never
    closes (a reply cut off while thinking)."""
    text = _REASONING_BLOCK.sub(" ", text)
    closes = list(_REASONING_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _REASONING_OPEN.search(text)
    if opened:
        text = text[:opened.start()]
    return text


def _object_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """The outermost balanced ``{...}`` spans of ``text`` in order (string-aware inside braces;
    a string ends at a line break at the latest, so a stray quote in prose swallows one line
    at most), and whether a brace was left open. One pass, linear in ``len(text)``: a brace in
    the prose before the answer that never closes does not hide the answer."""
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    quote = ""
    skip = -1
    for m in _SPECIAL.finditer(text):
        i = m.start()
        if i == skip:
            continue
        c = text[i]
        if quote:
            if c == "\\":
                skip = i + 1
            elif c == quote or c == "\n":
                quote = ""
            continue
        if c == "{":
            stack.append(i)
        elif c == "}":
            if stack:
                spans.append((stack.pop(), i + 1))
        elif c in "\"'" and stack:
            quote = c
    spans.sort()
    outer: list[tuple[int, int]] = []
    for s, e in spans:
        if not outer or s >= outer[-1][1]:
            outer.append((s, e))
    return outer, bool(stack)


def _load_object(blob: str) -> Any:
    """``blob`` as JSON (trailing commas tolerated) or a Python literal; raises ReplyError."""
    for candidate in (blob, _TRAILING_COMMA.sub(r"\1", blob)):
        try:
            return json.loads(candidate)
        except RecursionError:
            raise ReplyError("the JSON object is nested too deeply") from None
        except json.JSONDecodeError:
            continue
    if len(blob) <= _LITERAL_MAX_CHARS:
        try:  # single quotes, None/True/False: a Python literal
            return ast.literal_eval(_TRAILING_COMMA.sub(r"\1", blob))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            pass
    raise ReplyError("the JSON object is malformed (check quotes and commas)")


def json_objects(text: str | None) -> list[tuple[str, dict[str, Any] | ReplyError]]:
    """Every outermost ``{...}`` of a reply, reasoning stripped (:func:`strip_reasoning`), in
    order: ``(its text, the object)`` or ``(its text, why it cannot be read)``. Raises
    :class:`ReplyError` when the reply holds none."""
    if text is None or not str(text).strip():
        raise ReplyError("the reply was empty")
    raw = str(text)
    text = strip_reasoning(raw).strip()
    if not text:
        raise ReplyError("the reply holds only reasoning (a <think> block) and no answer")
    spans, left_open = _object_spans(text)
    if not spans:
        if left_open:
            raise ReplyError("the JSON object is cut off: it never closes with '}'")
        raise ReplyError("the reply holds no JSON object")
    out: list[tuple[str, dict[str, Any] | ReplyError]] = []
    for s, e in spans:
        blob = text[s:e]
        try:
            obj = _load_object(blob)
            out.append((blob, obj if isinstance(obj, dict) else ReplyError("expected a JSON object")))
        except ReplyError as exc:
            out.append((blob, exc))
    return out


def extract_json(text: str | None) -> dict[str, Any]:
    """The last readable JSON object inside a reply, tolerating reasoning blocks, fences, prose,
    trailing commas and Python literals. Raises :class:`ReplyError` naming what is wrong."""
    found = json_objects(text)
    for _, obj in reversed(found):
        if isinstance(obj, dict):
            return obj
    raise found[-1][1]  # type: ignore[misc]


# ---------------------------------------------------------------------------------- value rules
def unit_score(value: Any, name: str) -> float:
    """A score in [0, 1]; percentages (1 < v <= 100 with a % sign) are read as such."""
    if isinstance(value, str):
        s = value.strip()
        pct = s.endswith("%")
        try:
            value = float(s.rstrip("%")) / (100.0 if pct else 1.0)
        except ValueError:
            raise ValueError(f"{name} must be a number between 0 and 1, got {s!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {v:g}")
    return v


def normalize_bbox(value: Any, image_size: tuple[int, int] | None = None) -> list[float] | None:
    """[x0, y0, x1, y1] in [0, 1]; pixel boxes are divided by the image size (W, H) when known;
    swapped corners are ordered; None for null or unreadable boxes."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        keys = ("x0", "y0", "x1", "y1")
        value = [value.get(k) for k in keys] if all(k in value for k in keys) else None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    # Values well above 1 can only be pixels; small overshoots of a normalized box are clamped.
    if max(x0, y0, x1, y1) > 2.0:
        if image_size is None:
            return None
        w, h = image_size
        x0, x1, y0, y1 = x0 / w, x1 / w, y0 / h, y1 / h
    x0, x1 = sorted((min(1.0, max(0.0, x0)), min(1.0, max(0.0, x1))))
    y0, y1 = sorted((min(1.0, max(0.0, y0)), min(1.0, max(0.0, y1))))
    if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
        return None
    return [round(x0, 4), round(y0, 4), round(x1, 4), round(y1, 4)]


# ---------------------------------------------------------------------------------- reply models
class Candidate(BaseModel):
    id: str
    description: str = ""
    bbox: list[float] | None = None


class Action(BaseModel):
    """Either a tool call or a commit."""

    tool: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    candidate: str | None = None
    commit: bool = False

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if value is None:
            return {"commit": True}
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("commit", "stop", "done", "final", "finish"):
                return {"commit": True}
            return {"tool": value.strip()}
        if isinstance(value, dict):
            value = dict(value)
            for alias in ("name", "tool_name", "function"):
                if not value.get("tool") and isinstance(value.get(alias), str):
                    value["tool"] = value.pop(alias)
            for alias in ("arguments", "parameters", "params"):
                if "args" not in value and alias in value:
                    value["args"] = value.pop(alias)
            args = value.get("args")
            if isinstance(args, str):
                try:
                    value["args"] = extract_json(args)
                except ReplyError:
                    value["args"] = {}
            elif args is None:
                value["args"] = {}
            if not value.get("tool") and "commit" not in value:
                value["commit"] = True
            value["commit"] = bool(value.get("commit")) and not value.get("tool")
        return value


class Verdict(BaseModel):
    id: str
    status: Literal["refuted", "confirmed", "uncertain"]
    evidence: str = ""

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, v: Any) -> Any:
        s = str(v).strip().lower()
        for word, canonical in (("refut", "refuted"), ("confirm", "confirmed"), ("uncertain", "uncertain"),
                                ("unsure", "uncertain"), ("inconclusive", "uncertain"), ("normal", "refuted"),
                                ("anomal", "confirmed"), ("defect", "confirmed"), ("reject", "refuted")):
            if s.startswith(word):
                return canonical
        raise ValueError(f"verdict status must be refuted, confirmed or uncertain, got {v!r}")


class ProposeReply(BaseModel):
    initial_score: float
    candidates: list[Candidate] = Field(default_factory=list)
    action: Action = Field(default_factory=lambda: Action(commit=True))
    rationale: str = ""


class RefuteReply(BaseModel):
    verdicts: list[Verdict] = Field(default_factory=list)
    updated_score: float
    action: Action = Field(default_factory=lambda: Action(commit=True))
    rationale: str = ""


class CommitReply(BaseModel):
    anomaly_score: float
    confidence: float | None = None
    rationale: str = ""


class DirectReply(BaseModel):
    image_label: Literal["normal", "anomalous"]
    confidence: float
    anomaly_type: str | None = None
    evidence: str = ""
    bbox: list[float] | None = None

    @property
    def score(self) -> float:
        """P(anomalous) as the paper reads it: confidence if anomalous, else 1 - confidence."""
        return self.confidence if self.image_label == "anomalous" else 1.0 - self.confidence


# ------------------------------------------------------------------------- multiple choice
#: The options of a question as ``(letter, text)`` pairs (``Question.options``) or a mapping.
Options = Sequence[tuple[str, str]] | Mapping[str, str]

# "B", "(B)", "**B**", "B." as the whole reply.
_LETTER_ONLY = re.compile(r"^[\s\W_]*([A-Za-z])[\s\W_]*$")
# "Answer: B", "the answer is (B)", "Correct option: B" (the letter itself must be a capital).
_KEYWORD_LETTER = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:=\-]?\s*[(\[*]*\s*((?-i:[A-Z]))(?![A-Za-z0-9'])",
                             re.I)
# "B. a scratch", "(B) Top left", "B) ...", "B: ..." at the start of the reply.
_LEADING_LETTER = re.compile(r"^\s*[(\[*]*\s*([A-Z])\s*[*]*\s*[.):\]]")
# A capital letter standing alone ("I think C"); "A" before a lowercase word is the article
# ("A scratch"), unless the word is one that follows a letter ("A or C", "A is right").
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_ARTICLE = re.compile(r"\s+(?!(?:or|and|is|was|would|seems|looks|because|since|as)\b)[a-z]")


def _option_pairs(options: Options) -> list[tuple[str, str]]:
    pairs = list(options.items()) if isinstance(options, Mapping) else [tuple(o) for o in options]
    return [(str(k).strip().upper(), str(v)) for k, v in pairs]


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _choose(letter: str, letters: Sequence[str]) -> str:
    if letter.upper() not in letters:
        raise ReplyError(f"{letter!r} is not one of the options; answer with one of {', '.join(letters)}")
    return letter.upper()


def _by_option_text(text: str, pairs: list[tuple[str, str]]) -> str | None:
    """The option whose text the reply gives instead of its letter (whole words; when several
    match, a text contained in a longer matching one gives way to it)."""
    reply = _words(text)
    if not reply:
        return None
    exact = [k for k, v in pairs if _words(v) and _words(v) == reply]
    if len(exact) == 1:
        return exact[0]
    found = [(k, _words(v)) for k, v in pairs if _words(v) and f" {_words(v)} " in f" {reply} "]
    found = [(k, v) for k, v in found if not any(v != w and v in w for _, w in found)]
    return found[0][0] if len(found) == 1 else None


def read_letter(text: Any, options: Options) -> str:
    """The option letter a reply gives: "B", "(B)", "Answer: B", "B. a scratch", the option's
    text instead of its letter, or ``{"answer": "B"}``. Raises :class:`ReplyError` (the repair
    prompt's words) when the reply names no option, or several."""
    pairs = _option_pairs(options)
    letters = [k for k, _ in pairs]
    if not pairs:
        raise ValueError("the question has no options")
    if text is None or not str(text).strip():
        raise ReplyError("the reply was empty")
    text = strip_reasoning(str(text)).strip()
    if not text:
        raise ReplyError("the reply holds only reasoning (a <think> block) and no answer")
    if "{" in text:
        try:
            obj = extract_json(text)
        except ReplyError:
            obj = None
        if obj is not None:
            value = next((obj[k] for k in ("answer", "option", "choice", "letter") if obj.get(k) is not None), None)
            if value is not None and not isinstance(value, (dict, list)):
                return read_letter(value, pairs)
    one = _LETTER_ONLY.match(text)
    if one:
        return _choose(one.group(1), letters)
    keyed = _KEYWORD_LETTER.findall(text)
    if keyed:
        return _choose(keyed[-1], letters)
    lead = _LEADING_LETTER.match(text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    by_text = _by_option_text(text, pairs)
    if by_text is not None:
        return by_text
    lone = {m.group(1) for m in _LONE_LETTER.finditer(text)
            if m.group(1) in letters and not (m.group(1) == "A" and _ARTICLE.match(text[m.end():]))}
    if len(lone) == 1:
        return lone.pop()
    if len(lone) > 1:
        raise ReplyError(f"the reply names several options ({', '.join(sorted(lone))}); answer with one letter")
    raise ReplyError(f"the reply gives no option letter; answer with one of {', '.join(letters)}")


def read_option_scores(raw: Any, options: Options) -> dict[str, float] | None:
    """Per-option confidences ``{letter: 0..1}`` (percentages read as such); entries that name
    no option or hold no number are left out; None when nothing usable remains."""
    if not isinstance(raw, Mapping):
        return None
    out: dict[str, float] = {}
    for key, value in raw.items():
        try:
            letter = read_letter(key, options)
        except ReplyError:
            continue
        if isinstance(value, str):
            value = value.strip().rstrip("%")
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v) or v < 0:
            continue
        v = v / 100.0 if 1.0 < v <= 100.0 else v
        if v <= 1.0:
            out[letter] = round(v, 4)
    return out or None


class McqDirectReply(BaseModel):
    """The direct branch's answer: one option letter."""

    answer: str


class McqProposeReply(BaseModel):
    """The first refutation turn on a question: a tentative answer (or none yet) and an action."""

    answer: str | None = None
    option_scores: dict[str, float] | None = None
    action: Action = Field(default_factory=lambda: Action(commit=True))
    rationale: str = ""


class McqRefuteReply(BaseModel):
    """Verdicts on the options the last observation tested, the current answer, the next action."""

    verdicts: list[Verdict] = Field(default_factory=list)
    answer: str | None = None
    option_scores: dict[str, float] | None = None
    action: Action = Field(default_factory=lambda: Action(commit=True))
    rationale: str = ""


class McqCommitReply(BaseModel):
    answer: str
    option_scores: dict[str, float] | None = None
    rationale: str = ""


def _mcq_answer(obj: dict[str, Any], options: Options, *, required: bool) -> tuple[str | None, dict[str, float] | None]:
    """(answer letter, option scores) of an MCQ JSON reply; without an answer the best-scored
    option is the answer; ``required`` raises when neither is given."""
    scores = read_option_scores(obj.get("option_scores", obj.get("scores")), options)
    raw = next((obj[k] for k in ("answer", "option", "choice", "letter") if obj.get(k) not in (None, "")), None)
    if raw is not None:
        if isinstance(raw, (dict, list)):
            raise ReplyError('"answer" must be one option letter')
        return read_letter(raw, options), scores
    if scores:
        return max(scores, key=scores.get), scores
    if required:
        raise ReplyError('the reply has no "answer": give the letter of one option when you commit')
    return None, scores


def _mcq_verdicts(raw: Any, options: Options) -> list[Verdict]:
    if isinstance(raw, dict):
        raw = [{"id": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in raw.items()]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ReplyError("verdicts must be a list")
    out = []
    for v in raw:
        if not isinstance(v, dict) or "id" not in v or "status" not in v:
            raise ReplyError('each verdict needs "id" (an option letter) and "status"')
        try:
            vid = read_letter(v["id"], options)
        except ReplyError:
            vid = str(v["id"])
        out.append(Verdict(id=vid, status=v["status"], evidence=_text(v.get("evidence"))))
    return out


def parse_mcq_reply(stage: str, text: str | None, options: Options, *, prompt: str | None = None) -> BaseModel:
    """Parse a reply of the multiple-choice task (reasoning stripped, the last JSON object that
    validates and is not an echo of ``prompt``); raise :class:`ReplyError` for the repair prompt."""
    if stage == "mcq_direct":
        return McqDirectReply(answer=read_letter(text, options))

    def commit(obj: dict[str, Any]) -> BaseModel:
        answer, scores = _mcq_answer(obj, options, required=True)
        return McqCommitReply(answer=answer, option_scores=scores, rationale=_text(obj.get("rationale")))

    def turn(obj: dict[str, Any]) -> BaseModel:
        try:
            action = _action(obj)
            answer, scores = _mcq_answer(obj, options, required=action.commit)
            rationale = _text(obj.get("rationale") or obj.get("thought"))
            if stage == "mcq_propose":
                return McqProposeReply(answer=answer, option_scores=scores, action=action, rationale=rationale)
            return McqRefuteReply(verdicts=_mcq_verdicts(obj.get("verdicts"), options), answer=answer,
                                  option_scores=scores, action=action, rationale=rationale)
        except ValidationError as exc:
            raise ReplyError(exc.errors()[0]["msg"]) from None

    if stage == "mcq_commit":
        try:
            return last_valid_object(text, prompt, commit)
        except ReplyError:  # no usable JSON: a bare letter is a fine final answer
            return McqCommitReply(answer=read_letter(text, options))
    if stage in ("mcq_propose", "mcq_refute"):
        return last_valid_object(text, prompt, turn)
    raise ValueError(f"unknown multiple-choice stage {stage!r}")


def _text(v: Any) -> str:
    """A text field as a string of at most :data:`MAX_FIELD_CHARS` (a 50 MB rationale is cut,
    not stored in every place a rationale goes)."""
    if v is None:
        return ""
    try:
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = str(v)
    return clip(text, MAX_FIELD_CHARS)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f" [... {len(text) - limit} characters cut]"


def _candidates(raw: Any, image_size: tuple[int, int] | None, limit: int) -> list[Candidate]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ReplyError("candidates must be a list")
    out: list[Candidate] = []
    seen: set[str] = set()
    for i, c in enumerate(raw[:limit]):
        if isinstance(c, str):
            c = {"description": c}
        if not isinstance(c, dict):
            continue
        cid = str(c.get("id") or f"c{i + 1}")
        if cid in seen:
            cid = f"c{i + 1}"
        seen.add(cid)
        desc = _text(c.get("description") or c.get("name") or c.get("feature"))
        bbox = normalize_bbox(c.get("bbox", c.get("box")), image_size)
        out.append(Candidate(id=cid, description=desc, bbox=bbox))
    return out


def _action(obj: dict[str, Any]) -> Action:
    raw = obj.get("action")
    # The released format: "action": "call_tool" with "tool"/"args" beside it.
    if isinstance(raw, str) and raw.strip().lower() in ("call_tool", "tool", "use_tool"):
        raw = {"tool": obj.get("tool"), "args": obj.get("args"), "candidate": obj.get("candidate")}
    try:
        action = Action.model_validate(raw if raw is not None else {"commit": True})
    except ValidationError as exc:
        raise ReplyError(f"action is malformed: {exc.errors()[0]['msg']}") from None
    if action.candidate is not None:
        action.candidate = str(action.candidate)
    return action


def parse_reply(stage: Stage, text: str | None, *, image_size: tuple[int, int] | None = None,
                max_candidates: int = 5, prompt: str | None = None, options: Options | None = None,
                tool_call: dict[str, Any] | None = None) -> BaseModel:
    """Parse the reply of ``stage``; raise :class:`ReplyError` for the repair prompt.

    Reasoning is stripped first; of the JSON objects left, the LAST one that validates for
    ``stage`` is the answer (a draft before the final answer, or an example the model quotes,
    loses). An object that appears verbatim in ``prompt`` (the text the model was sent) is the
    model echoing its prompt, such as a JSON example planted in a domain card, and is never
    taken as the answer. The multiple-choice stages need the question's ``options``.

    ``tool_call`` (``{"name", "args"}``, native tool calling) is the reply's action, testing the
    candidate the JSON names under ``"candidate"``.
    """
    if stage in MCQ_STAGES:
        if not options:
            raise ValueError(f"stage {stage!r} needs the question's options")
        return parse_mcq_reply(stage, text, options, prompt=prompt)
    return last_valid_object(text, prompt, lambda obj: _validate(stage, with_tool_call(obj, tool_call), image_size,
                                                                 max_candidates))


def with_tool_call(obj: dict[str, Any], tool_call: dict[str, Any] | None) -> dict[str, Any]:
    """A reply object with a native ``tool_call`` as its action, testing the candidate the
    object names under ``"candidate"`` (unchanged without a call)."""
    if tool_call is None:
        return obj
    return {**obj, "action": {"tool": tool_call.get("name"), "args": tool_call.get("args") or {},
                              "candidate": obj.get("candidate")}}


def last_valid_object(text: str | None, prompt: str | None, validate: Callable[[dict[str, Any]], BaseModel]
                      ) -> BaseModel:
    """``validate`` applied to the reply's JSON objects from the last one back: the first that
    validates and is not an echo of ``prompt``; raises the latest object's :class:`ReplyError`."""
    found = json_objects(text)
    problem: ReplyError | None = None
    echoed = 0
    for blob, obj in reversed(found):
        if prompt and blob in prompt:
            echoed += 1
            continue
        if isinstance(obj, ReplyError):
            problem = problem or obj
            continue
        try:
            return validate(obj)
        except ReplyError as exc:
            problem = problem or exc
    if problem is None and echoed:
        raise ReplyError("the reply only repeats JSON from the prompt; answer with your own JSON object")
    raise problem  # type: ignore[misc]


def _validate(stage: Stage, obj: dict[str, Any], image_size: tuple[int, int] | None,
              max_candidates: int) -> BaseModel:
    """``obj`` as the validated reply model of ``stage``; raises :class:`ReplyError`."""
    try:
        if stage == "propose":
            return ProposeReply(
                initial_score=unit_score(_first(obj, "initial_score", "anomaly_score", "score"), "initial_score"),
                candidates=_candidates(obj.get("candidates", obj.get("candidate_features")), image_size, max_candidates),
                action=_action(obj), rationale=_text(obj.get("rationale") or obj.get("thought")))
        if stage == "refute":
            raw_verdicts = obj.get("verdicts") or []
            if isinstance(raw_verdicts, dict):
                raw_verdicts = [{"id": k, **(v if isinstance(v, dict) else {"status": v})}
                                for k, v in raw_verdicts.items()]
            if not isinstance(raw_verdicts, list):
                raise ReplyError("verdicts must be a list")
            verdicts = []
            for v in raw_verdicts:
                if not isinstance(v, dict) or "id" not in v or "status" not in v:
                    raise ReplyError('each verdict needs "id" and "status"')
                verdicts.append(Verdict(id=str(v["id"]), status=v["status"], evidence=_text(v.get("evidence"))))
            return RefuteReply(
                verdicts=verdicts,
                updated_score=unit_score(_first(obj, "updated_score", "anomaly_score", "score"), "updated_score"),
                action=_action(obj), rationale=_text(obj.get("rationale") or obj.get("thought")))
        if stage == "commit":
            conf = obj.get("confidence")
            if conf is not None:
                try:
                    conf = float(conf)
                    conf = conf * 100.0 if 0.0 <= conf <= 1.0 else conf
                    conf = min(100.0, max(0.0, conf)) if math.isfinite(conf) else None
                except (TypeError, ValueError):
                    conf = None
            return CommitReply(anomaly_score=unit_score(_first(obj, "anomaly_score", "score", "final_score"),
                                                        "anomaly_score"),
                               confidence=conf, rationale=_text(obj.get("rationale")))
        if stage == "direct":
            label = str(_first(obj, "image_label", "label")).strip().lower()
            if label.startswith(("anomal", "abnormal", "defect")):
                label = "anomalous"
            elif label.startswith(("normal", "good", "ok")):
                label = "normal"
            else:
                raise ReplyError(f'image_label must be "normal" or "anomalous", got {label!r}')
            conf = _first(obj, "confidence")
            if isinstance(conf, (int, float)) and not isinstance(conf, bool) and 1.0 < conf <= 100.0:
                conf = conf / 100.0  # a percentage: "confidence": 85
            return DirectReply(image_label=label, confidence=unit_score(conf, "confidence"),
                               anomaly_type=None if obj.get("anomaly_type") is None else _text(obj.get("anomaly_type")),
                               evidence=_text(obj.get("evidence")),
                               bbox=normalize_bbox(obj.get("bbox"), image_size))
    except ValueError as exc:  # pydantic ValidationError and unit_score's errors
        if isinstance(exc, ReplyError):
            raise
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ReplyError(msg) from None
    raise ValueError(f"unknown stage {stage!r}")


def _first(obj: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    raise ReplyError(f'the reply has no "{keys[0]}"')


def parse_label_logprobs(top_logprobs: list[dict[str, Any]]) -> float | None:
    """P(anomalous) from the first generated token's top log-probs, renormalised over the
    tokens that start "normal" or "anomalous"; None when neither is among them."""
    p_anom = p_norm = 0.0
    for entry in top_logprobs or []:
        token = str(entry.get("token", "")).strip().lower()
        lp = entry.get("logprob")
        if not isinstance(lp, (int, float)) or not token:
            continue
        if "anomalous".startswith(token) or token.startswith("anom") or token.startswith("abnorm"):
            p_anom += math.exp(lp)
        elif "normal".startswith(token) or token.startswith("norm"):
            p_norm += math.exp(lp)
    total = p_anom + p_norm
    return None if total <= 0 else p_anom / total
