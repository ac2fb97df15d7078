"""MMAD's multiple-choice question file (``mmad.json``) as items and questions for ``--task mcqa``.

The format, as the MMAD project (GitHub ``jam-cc/MMAD``; the file itself is published on Hugging
Face as ``jiang-cc/MMAD``, too large for the repository) writes and reads it:

* one JSON object keyed by the query image's path relative to the data root, e.g.
  ``"DS-MVTec/bottle/image/broken_large/000.png"``; the first path component is the source
  dataset (DS-MVTec, MVTec-LOCO, VisA, GoodsAD), the second the object class. Every query
  script iterates the keys and joins them to the data root (``__main__`` of
  ``evaluation/examples/Transformers/qwen2_5_vl_query.py`` and ``evaluation/examples/GPT4/gpt4o.py``);
  the scorer takes the dataset from component 0 (``evaluation/examples/helper/summary.py``,
  ``caculate_accuracy_mmad``);
* each value holds ``conversation``, a list of ``{"Question", "Options": {"A": ..., ...},
  "Answer", "type", "annotation"}`` (read by ``GPT4Query.parse_conversation`` in
  ``evaluation/examples/GPT4/gpt4v.py``), the normal templates ``random_templates`` and
  ``similar_templates`` (lists of paths relative to the data root), and ``mask_path``
  (relative to ``<dataset>/<class>/``, as ``evaluation/examples/Transformers/internvl_query.py``
  resolves it; ground truth, never shown to a model);
* question types, as ``caculate_accuracy_mmad`` reads them: Anomaly Detection, Defect
  Classification, Defect Localization, Defect Description, Defect Analysis, Object
  Classification, Object Structure and Object Details (the last two scored together as Object
  Analysis); answers outside A-E are dropped there, so options here are lettered A to E;
* the protocol's references are the first ``k`` of ``random_templates`` (``similar_templates``
  with ``--similar_template``), ``k = --few_shot_model``, 1 by default, in every query script;
* ``domain_knowledge.json`` (``dataset/MMAD/domain_knowledge.json``) maps dataset ("MVTec" for
  DS-MVTec), class and state to a text; ``qwen2_5_vl_query.py`` gives the model all texts of
  the image's class, joined by newlines (nothing chosen per image, so no label leaks). Here that
  text goes into the item's domain card.

Validation follows :mod:`.manifests`: a file that is not such an object is an error naming it; a
bad entry or question (missing image or template, malformed options, an answer that is no option
...) becomes an error record for each question it concerns, never a crash. Paths resolve under the
data root: ``data_root`` (``--data-root``), else ``ANOMALYCLAW_DATA`` (or its ``MMAD/`` folder),
else the folder that holds ``mmad.json`` (where MMAD keeps it), the first of these under which
the file's query images are found.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from anomalyclaw.domains import BUILTIN_CARDS, DomainCard, find_card
from anomalyclaw.errors import ManifestError
from anomalyclaw.items import Item, Question

from .manifests import data_root_from_env

#: MMAD's question types, in the order its tables show them.
MMAD_TYPES = ("Anomaly Detection", "Defect Classification", "Defect Localization", "Defect Description",
              "Defect Analysis", "Object Classification", "Object Structure", "Object Details")
#: Option letters MMAD's scorer accepts.
LETTERS = ("A", "B", "C", "D", "E")
#: Template lists an entry carries, by ``--mmad-refs`` choice.
TEMPLATE_KEYS = {"random": "random_templates", "similar": "similar_templates"}
#: MMAD's datasets and the built-in cards that describe them.
DATASET_CARDS = {"DS-MVTec": "D1", "MVTec-AD": "D1", "MVTec-LOCO": "D3", "VisA": "D2", "GoodsAD": "D5"}
#: How domain_knowledge.json names a dataset.
KNOWLEDGE_DATASETS = {"DS-MVTec": "MVTec"}
#: MMAD's test for a normal image: its path contains this (``normal_flag`` in summary.py).
NORMAL_FLAG = "good"


@dataclass(frozen=True)
class MCQuestion:
    """One question as the loader and the scorer know it: the model's view (``question``) plus
    what only the scorer may read (``answer``, ``question_type``)."""

    question: Question
    image: str
    """The query image's key in mmad.json (its path relative to the data root)."""
    dataset: str
    category: str | None
    question_type: str
    answer: str

    @property
    def question_id(self) -> str:
        return self.question.question_id

    def meta(self) -> dict[str, Any]:
        """The fields every record of this question carries."""
        return {"question_id": self.question_id, "image": self.image, "dataset": self.dataset,
                "question_type": self.question_type, "answer": self.answer, "question": self.question.text,
                "options": dict(self.question.options)}


@dataclass
class MMADImage:
    """One query image: the item the graphs judge (query, templates as references, card) and
    the questions about it."""

    item: Item
    questions: list[MCQuestion] = field(default_factory=list)


@dataclass
class RejectedQuestion:
    """A question (or a whole entry, ``#entry``) that cannot be asked, and why."""

    question_id: str
    image: str
    dataset: str | None
    category: str | None
    question_type: str | None
    answer: str | None
    reasons: list[str]

    def meta(self) -> dict[str, Any]:
        return {"question_id": self.question_id, "image": self.image, "dataset": self.dataset,
                "question_type": self.question_type, "answer": self.answer}


@dataclass
class MMADContents:
    """What an MMAD file holds: the askable questions grouped by image, and the rest with reasons."""

    source: str
    data_root: Path
    refs: str
    n_refs: int
    images: list[MMADImage] = field(default_factory=list)
    rejected: list[RejectedQuestion] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    """(where, field, message) for each rejected question or entry, as manifests report them."""

    @property
    def n_questions(self) -> int:
        return sum(len(im.questions) for im in self.images)

    def limited(self, n_questions: int) -> "MMADContents":
        """The first ``n_questions`` askable questions (whole images first), nothing rejected."""
        out = MMADContents(self.source, self.data_root, self.refs, self.n_refs)
        left = n_questions
        for im in self.images:
            if left <= 0:
                break
            out.images.append(MMADImage(im.item, im.questions[:left]))
            left -= len(out.images[-1].questions)
        return out


def question_id(image: str, index: int | str) -> str:
    """A question's id: its image's key and its place in the conversation (``...png#2``)."""
    return f"{image}#{index}"


def resolve_mmad_path(path: str | os.PathLike) -> Path:
    """An MMAD question file, or a folder holding ``mmad.json``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "mmad.json"
    if not p.is_file():
        raise ManifestError(str(p), [(str(p), "path", "MMAD question file does not exist (expected mmad.json)")])
    return p


def _load_json_object(src: Path) -> tuple[dict[str, Any], list[str]]:
    """The top-level object and the keys it repeats (JSON allows them; the last one would win)."""
    repeated: list[list[str]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        repeated.append([k for k, _ in pairs if k in seen or seen.add(k)])
        return dict(pairs)

    try:
        data = json.loads(src.read_text(encoding="utf-8"), object_pairs_hook=pairs_hook)
    except UnicodeDecodeError as exc:
        raise ManifestError(str(src), [(str(src), "(file)", f"not UTF-8 text: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise ManifestError(str(src), [(str(src), "(file)", f"not valid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ManifestError(str(src), [(str(src), "(file)", "expected one JSON object keyed by query image paths "
                                        f"(MMAD's mmad.json), got a {type(data).__name__}")])
    return data, repeated[-1] if repeated else []


def _relative_key(value: Any) -> PurePosixPath | None:
    """A key or template path as a safe relative path (no root, no '..'), else None."""
    if not isinstance(value, str) or not value.strip() or "\\" in value:
        return None
    p = PurePosixPath(value.strip())
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p


def resolve_data_root(src: Path, keys: Iterable[str], data_root: str | os.PathLike | None = None) -> Path:
    """The folder the file's paths are relative to (see the module docstring for the order)."""
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise ManifestError(str(src), [(str(src), "data_root", f"{root} is not a folder")])
        return root.resolve()
    env = data_root_from_env()
    candidates = ([env, env / "MMAD"] if env is not None else []) + [src.parent]
    probe = [k for k in (_relative_key(k) for k in list(keys)[:20]) if k is not None]
    for root in candidates:
        if any((root / k).is_file() for k in probe):
            return root.resolve()
    return candidates[0].resolve()


def load_domain_knowledge(path: str | os.PathLike) -> dict[tuple[str, str], str]:
    """MMAD's ``domain_knowledge.json`` as ``{(dataset, class): text}``: every text of the class
    joined by newlines, in the file's order; datasets named as mmad.json names them."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise ManifestError(str(src), [(str(src), "path", "domain knowledge file does not exist")])
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(str(src), [(str(src), "(file)", f"not valid JSON: {exc}")]) from None
    problems: list[tuple[str, str, str]] = []
    out: dict[tuple[str, str], str] = {}
    if not isinstance(data, dict):
        raise ManifestError(str(src), [(str(src), "(file)", "expected {dataset: {class: {state: text}}}")])
    back = {v: k for k, v in KNOWLEDGE_DATASETS.items()}
    for dataset, classes in data.items():
        if not isinstance(classes, dict):
            problems.append((f"dataset {dataset!r}", "(value)", "expected {class: {state: text}}"))
            continue
        for cls, states in classes.items():
            if not isinstance(states, dict) or not all(isinstance(t, str) for t in states.values()):
                problems.append((f"{dataset}/{cls}", "(value)", "expected {state: text} with text values"))
                continue
            out[(back.get(dataset, dataset), cls)] = "\n".join(t.strip() for t in states.values() if t.strip())
    if problems:
        raise ManifestError(str(src), problems)
    return out


def dataset_card(dataset: str) -> DomainCard:
    """The card of an MMAD dataset (the matching CrossDomainVAD-12 card), of a synthetic domain
    folder (``S2_coin_count``: its own card), or a generic card named after it."""
    if dataset in DATASET_CARDS:
        return BUILTIN_CARDS[DATASET_CARDS[dataset]]
    from .synth.table import DOMAINS

    code = dataset.split("_", 1)[0]
    if code in DOMAINS and dataset == f"{code}_{DOMAINS[code].name}":
        return DOMAINS[code].card
    return find_card(dataset, dataset)


def _check_question(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """(readable fields, problems) of one conversation entry."""
    if not isinstance(raw, dict):
        return {}, [f"expected a question object, got {type(raw).__name__}"]
    problems: list[str] = []
    fields: dict[str, Any] = {}
    text = raw.get("Question")
    if not isinstance(text, str) or not text.strip():
        problems.append(f"'Question' must be a non-empty string, got {text!r}")
    fields["text"] = text.strip() if isinstance(text, str) else ""
    qtype = raw.get("type")
    if not isinstance(qtype, str) or not qtype.strip():
        problems.append(f"'type' must be a non-empty string, got {qtype!r}")
    else:
        fields["type"] = qtype.strip()
    options = raw.get("Options")
    if not isinstance(options, dict) or len(options) < 2:
        problems.append(f"'Options' must be an object of at least two lettered options, got {options!r}"[:300])
        options = {}
    else:
        bad = [k for k in options if k not in LETTERS]
        if bad:
            problems.append(f"option letters must be {', '.join(LETTERS)} (MMAD's scorer reads no others), got {bad}")
        empty = [k for k, v in options.items() if not isinstance(v, str) or not v.strip()]
        if empty:
            problems.append(f"options {empty} have no text")
    answer = raw.get("Answer")
    if isinstance(answer, str) and answer.strip():
        fields["answer"] = answer.strip()
    if not isinstance(answer, str) or answer.strip() not in options:
        problems.append(f"'Answer' must be one of the option letters {sorted(options)}, got {answer!r}")
    fields["options"] = tuple((k, str(v).strip()) for k, v in options.items())
    return fields, problems


def read_mmad(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None, refs: str = "random",
              n_refs: int = 1, domain_knowledge: str | os.PathLike | Mapping[tuple[str, str], str] | None = None,
              datasets: Iterable[str] | None = None) -> MMADContents:
    """Parse and validate an MMAD question file.

    ``refs`` picks the template list (``random``: MMAD's default, or ``similar``) and ``n_refs``
    how many of its first templates become the item's references (MMAD's protocol: 1).
    ``domain_knowledge`` is a ``domain_knowledge.json`` path (or its loaded form) whose text goes
    into each item's card; ``datasets`` keeps only those source datasets (path component 0).
    """
    if refs not in TEMPLATE_KEYS:
        raise ManifestError(str(path), [(str(path), "refs", f"choose random or similar, got {refs!r}")])
    if not isinstance(n_refs, int) or n_refs < 1:
        raise ManifestError(str(path), [(str(path), "n_refs", f"at least 1 template is needed, got {n_refs!r}")])
    src = resolve_mmad_path(path)
    data, repeated = _load_json_object(src)
    root = resolve_data_root(src, data.keys(), data_root)
    knowledge = (load_domain_knowledge(domain_knowledge) if isinstance(domain_knowledge, (str, os.PathLike))
                 else dict(domain_knowledge or {}))
    wanted = None if datasets is None else {d.strip() for d in datasets if d.strip()}
    out = MMADContents(source=str(src), data_root=root, refs=refs, n_refs=n_refs)
    template_key = TEMPLATE_KEYS[refs]
    for key in repeated:
        out.problems.append((f"image {key!r}", "(key)", "appears more than once in the file; only its last "
                             "entry is read (JSON keeps the last)"))
    for key, entry in data.items():
        rel = _relative_key(key)
        parts = rel.parts if rel is not None else ()
        dataset = parts[0] if parts else None
        if wanted is not None and dataset not in wanted:
            continue
        category = parts[1] if len(parts) >= 3 else None
        image_problems: list[str] = []
        if rel is None:
            image_problems.append("the key must be the query image's path relative to the data root "
                                  "(no leading '/', no '..')")
        elif not (root / rel).is_file():
            image_problems.append(f"query image not found: {root / rel}")
        conversation = entry.get("conversation") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(conversation, list):
            why = (f"expected an object with a 'conversation' list, got {type(entry).__name__}"
                   if not isinstance(entry, dict) else "'conversation' must be a list of questions")
            out.rejected.append(RejectedQuestion(question_id(key, "entry"), key, dataset, category, None, None,
                                                 image_problems + [why]))
            out.problems.append((f"image {key!r}", "conversation", why))
            continue
        templates = entry.get(template_key)
        refs_found: list[Path] = []
        if not isinstance(templates, list) or not templates:
            image_problems.append(f"'{template_key}' is empty or missing: the agent needs at least one normal "
                                  "template image")
        else:
            for t in templates[:n_refs]:
                t_rel = _relative_key(t)
                if t_rel is None:
                    image_problems.append(f"template {t!r} is not a path relative to the data root")
                elif not (root / t_rel).is_file():
                    image_problems.append(f"template image not found: {root / t_rel}")
                else:
                    refs_found.append((root / t_rel).resolve())
        questions: list[MCQuestion] = []
        for index, raw in enumerate(conversation):
            qid = question_id(key, index)
            fields, problems = _check_question(raw)
            problems = image_problems + problems
            if problems:
                out.rejected.append(RejectedQuestion(qid, key, dataset, category, fields.get("type"),
                                                     fields.get("answer"), problems))
                out.problems.extend((f"question {qid!r}", "conversation", p) for p in problems)
                continue
            questions.append(MCQuestion(Question(qid, fields["text"], fields["options"]), image=key,
                                        dataset=dataset, category=category, question_type=fields["type"],
                                        answer=fields["answer"]))
        if not questions:
            continue
        card = dataset_card(dataset)
        text = knowledge.get((dataset, category or ""))
        if text:
            card = replace(card, knowledge=text)
        mask = entry.get("mask_path")
        normal = NORMAL_FLAG in key
        item = Item(item_id=key, query_path=(root / rel).resolve(), ref_paths=tuple(refs_found), domain=dataset,
                    domain_code=dataset, label=0 if normal else 1,
                    anomaly_type=None if normal or len(parts) < 3 else parts[-2], source_dataset=dataset,
                    category=category, mask_path=(root / dataset / (category or "") / mask).resolve()
                    if isinstance(mask, str) and mask.strip() and category else None,
                    card=card, extra={"mmad_templates": refs})
        out.images.append(MMADImage(item, questions))
    return out
