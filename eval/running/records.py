"""The run record: one schema for everything that writes or reads per-item results.

Field names follow the released CrossDomainVAD-12 records (``v9_score`` is the refutation
branch's score there) so that both this project's JSON-lines runs and the released ``D*.json``
arrays load into the same :class:`Record`. Writing is append-only JSON lines, flushed and
fsync'ed per item, so a run killed at any moment loses nothing it finished. The mapping from a
finished graph state to a record (:func:`record_from_state`) lives here too, beside the schema.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticSerializationError

from anomalyclaw.config import redact_value
from anomalyclaw.errors import AnomalyClawError, OutputError
from anomalyclaw.items import Item
from anomalyclaw.paths import writable_folder, write_atomic

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SCHEMA_VERSION = 1

#: Fields that hold a score. Accepted: finite numbers and strings that read as one ("0.8");
#: anything else (booleans, "NaN", "inf", "high", lists) is not a score.
SCORE_FIELDS = ("anomaly_score", "direct_score", "refute_score", "v9_score", "v9_initial_score",
                "v9_updated_score", "expert_score", "confidence")
#: Label strings accepted (case and surrounding blanks ignored), besides the numbers 0 and 1 and
#: the JSON booleans false and true.
LABEL_WORDS = {"0": 0, "1": 1, "normal": 0, "anomalous": 1}
ACCEPTED_LABELS = '0/1, true/false, "0"/"1", "normal"/"anomalous"'
ACCEPTED_SCORES = 'finite numbers or numeric strings such as "0.8"'


def parse_label(value: Any) -> int | None:
    """A label in one of the accepted forms as 0 or 1 (None for None); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise ValueError(f"label {show_value(value)} is not one of {ACCEPTED_LABELS}")


def parse_score(value: Any) -> float | None:
    """A score in one of the accepted forms as a finite float (None for None); ValueError
    otherwise, NaN and infinities included."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"score {show_value(value)} is not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"score {show_value(value)} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"score {show_value(value)} is not finite")
    return number


def show_value(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Record(BaseModel):
    """One item's outcome, errors included. Unknown fields (released MCQ fields) are kept."""

    model_config = ConfigDict(extra="allow")

    item_id: str
    domain_code: str | None = None
    domain: str | None = None
    category: str | None = None
    split: str | None = None
    label_gt: int | None = None
    anomaly_type_gt: str | None = None
    mode: str = "anomaly_detection"

    anomaly_score: float | None = None
    """The fused score: the blend ``w_direct*direct_score + w_v9*refute_score``, and with
    ``w_expert`` > 0 the expert term, ``(blend + 4*w_expert*expert_score) / (1 + 4*w_expert)``
    (``anomalyclaw.scores.fuse``)."""
    direct_score: float | None = None
    refute_score: float | None = None
    v9_score: float | None = None
    """The released name of the refutation score; kept equal to ``refute_score``."""
    v9_initial_score: float | None = None
    v9_updated_score: float | None = None
    expert_score: float | None = None
    """The expert term's unit score in [0, 1]: the logistic of the mean of ``expert_z``."""
    expert_z: dict[str, float] = Field(default_factory=dict)
    """Each expert's z-score against the item's references' leave-one-out scores, by name."""
    w_direct: float = 0.5
    w_v9: float = 0.5
    w_expert: float = 0.0

    rationale: str = ""
    confidence: float | None = None
    n_turns: int = 0
    tools_used: list[str] = Field(default_factory=list)
    candidate_features: list[Any] = Field(default_factory=list)
    remaining_features: list[Any] = Field(default_factory=list)
    refutation_verdicts: list[Any] = Field(default_factory=list)
    history: list[Any] = Field(default_factory=list)
    direct_rationale: str | None = None

    localization: dict[str, Any] | None = None
    """Where the anomaly is (``graph.localize``): ``boxes`` (confirmed: normalized ``bbox``
    [x0, y0, x1, y1], ``score``, ``candidate``, ``tool``; best first), ``refuted`` boxes,
    ``direct_bbox``, ``map_shape`` [H, W], and ``map`` / ``expert_map``: the 16-bit grey PNG
    files of the agent's and the expert's maps, relative to the run folder (None with
    ``--no-maps``). None when the run did not localize (an error, an older record)."""
    label_pred: int | None = None
    """1 (anomalous) or 0 when ``anomaly_score`` reaches ``threshold`` (``run --threshold`` or
    ``--threshold-from``); None without a threshold or a score."""
    threshold: float | None = None
    """The image threshold ``label_pred`` was decided at."""

    error: str | None = None
    """Why the item could not be judged (then the scores are missing); None when it was."""
    direct_error: str | None = None
    refute_error: str | None = None
    fallbacks: list[str] = Field(default_factory=list)
    """Non-fatal degradations: a repair retry that failed, a forced commit, a dropped tool call."""

    backend: str | None = None
    model: str | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    """Seconds: ``total_s``, ``direct_s``, ``refute_s``, ``tools_s``, ``vlm_s``."""
    usage: dict[str, Any] = Field(default_factory=dict)
    """``requests``, ``prompt_tokens``, ``completion_tokens``, ``request_bytes``, ``images_sent``,
    ``retries`` over both branches; ``calls`` lists each VLM call."""
    run_id: str | None = None
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="before")
    @classmethod
    def _accepted_values(cls, data: Any, info: ValidationInfo) -> Any:
        """``null`` where a field has a non-null default (a list, a string, a weight) reads as
        that default; labels and scores are read in their accepted forms. A value in no accepted
        form becomes null: when the reader passes ``context={"problems": [...]}`` it is
        appended there as ``(field, value)`` to be counted; in code, a non-finite score is
        simply null and any other bad value is an error."""
        if not isinstance(data, dict):
            return data
        problems = info.context.get("problems") if isinstance(info.context, dict) else None
        data = dict(data)
        for name, spec in cls.model_fields.items():
            if name in data and data[name] is None and not spec.is_required() and \
                    (spec.default_factory is not None or spec.default is not None):
                del data[name]
        for name, parse in [("label_gt", parse_label), *((f, parse_score) for f in SCORE_FIELDS)]:
            if name not in data:
                continue
            try:
                data[name] = parse(data[name])
            except ValueError:
                value = data[name]
                data[name] = None
                if problems is not None:
                    problems.append((name, value))
                elif not (name in SCORE_FIELDS and isinstance(value, numbers.Real) and not isinstance(value, bool)):
                    raise
        return data

    @model_validator(mode="after")
    def _sync_refute(self) -> "Record":
        # Released records carry only v9_score; ours write both. Keep them one value.
        if self.refute_score is None and self.v9_score is not None:
            self.refute_score = self.v9_score
        elif self.v9_score is None and self.refute_score is not None:
            self.v9_score = self.refute_score
        return self

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_line(self, secrets: Iterable[str] = ()) -> str:
        """The record as one line of strict JSON (no NaN). Values a tool left as NumPy scalars or
        arrays, or as non-finite floats, are written as plain numbers, lists or null. Every form
        of each of ``secrets`` is blanked in the values before they are serialised
        (:func:`~anomalyclaw.config.redact_value`), never in the serialised text."""
        try:
            values = self.model_dump(mode="json")
            json.dumps(values, allow_nan=False)
        except (PydanticSerializationError, ValueError):
            values = _plain(self.model_dump(mode="python"))
        values = redact_value(values, secrets)
        line = json.dumps(values, ensure_ascii=False, allow_nan=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (an id read from odd bytes): escape it
            line = json.dumps(values, ensure_ascii=True, allow_nan=False)
        return line


def _plain(value: Any) -> Any:
    """``value`` with NumPy types, paths and non-finite floats turned into strict-JSON values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------ from a run to a record

def now() -> str:
    """The time as records write it (UTC, ISO 8601)."""
    # Milliseconds: enough to order the records of a fast run (the bench reads its rate from them).
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def error_record(item: Item, error: str, *, run_id: str, backend: str, model: str,
                 elapsed_s: float = 0.0) -> Record:
    return Record(item_id=item.item_id, domain_code=item.domain_code, domain=item.domain, category=item.category,
                  split=item.split, label_gt=item.label, anomaly_type_gt=item.anomaly_type, error=error,
                  backend=backend, model=model, run_id=run_id, finished_at=now(),
                  timings={"total_s": round(elapsed_s, 4)})


def record_from_state(item: Item, state: dict[str, Any], *, run_id: str, backend: str, model: str,
                      elapsed_s: float) -> Record:
    """The record of one finished pipeline run (field names as in the released records)."""
    calls = list(state.get("calls", [])) + [dict(c, branch="direct") for c in state.get("direct_calls", [])]
    history = list(state.get("history", []))
    observations = state.get("observations", [])
    refute_score, direct_score = state.get("refute_score"), state.get("direct_score")
    error = None
    if refute_score is None and direct_score is None:
        error = "both branches failed: " + "; ".join(
            e for e in (state.get("direct_error"), state.get("refute_error")) if e)
    candidates = [c for c in (history[0].get("candidates", []) if history else [])]
    weights = state.get("weights") or {}
    updates = [h.get("anomaly_score") for h in history[1:] if h.get("stage") == "refute"]
    return Record(
        item_id=item.item_id, domain_code=item.domain_code, domain=item.domain, category=item.category,
        split=item.split, label_gt=item.label, anomaly_type_gt=item.anomaly_type,
        anomaly_score=state.get("anomaly_score"), direct_score=direct_score, refute_score=refute_score,
        v9_initial_score=state.get("initial_score"), v9_updated_score=updates[-1] if updates else None,
        expert_score=state.get("expert_score"), expert_z=dict(state.get("expert_z") or {}),
        localization=_plain_localization(state.get("localization")),
        w_direct=weights.get("direct", 0.5), w_v9=weights.get("refute", 0.5), w_expert=weights.get("expert", 0.0),
        rationale=state.get("refute_rationale") or "", confidence=state.get("refute_confidence"),
        n_turns=len({h.get("turn") for h in history}), tools_used=list(state.get("tools_used", [])),
        candidate_features=candidates,
        remaining_features=[c for c in state.get("candidates", []) if c.get("status") != "refuted"],
        refutation_verdicts=list(state.get("verdicts", [])), history=history,
        direct_rationale=json.dumps(state.get("direct_reply"), ensure_ascii=False) if state.get("direct_reply") else None,
        error=error, direct_error=state.get("direct_error"), refute_error=state.get("refute_error"),
        fallbacks=list(state.get("fallbacks", [])) + list(state.get("direct_fallbacks", [])),
        backend=backend, model=model, run_id=run_id, finished_at=now(),
        timings={"total_s": round(elapsed_s, 4),
                 "vlm_s": round(sum(c.get("latency_s") or 0.0 for c in calls), 4),
                 "tools_s": round(sum(o.get("elapsed_s") or 0.0 for o in observations), 4)},
        usage={"requests": len(calls),
               "prompt_tokens": sum(c.get("prompt_tokens") or 0 for c in calls),
               "completion_tokens": sum(c.get("completion_tokens") or 0 for c in calls),
               "request_bytes": sum(c.get("request_bytes") or 0 for c in calls),
               "images_sent": sum(c.get("images_sent") or 0 for c in calls),
               "retries": sum(c.get("retries") or 0 for c in calls), "calls": calls},
    )


# ---------------------------------------------------------------- the multiple-choice task

#: The ``mode`` of a multiple-choice record (``--task mcqa``); score records keep the default.
MCQA_MODE = "mcqa"


def mcq_error_record(question: dict[str, Any], error: str, *, item: Item | None = None, run_id: str, backend: str,
                     model: str, elapsed_s: float = 0.0) -> Record:
    """A question that could not be asked (a missing image, a malformed question, a failure):
    ``question`` is the loader's ``meta()`` (id, image, dataset, type, answer)."""
    base = (error_record(item, error, run_id=run_id, backend=backend, model=model, elapsed_s=elapsed_s)
            if item is not None else Record(item_id=question["question_id"], error=error, run_id=run_id,
                                            backend=backend, model=model, finished_at=now(),
                                            domain_code=question.get("dataset"), domain=question.get("dataset")))
    return base.model_copy(update={"item_id": question["question_id"], "mode": MCQA_MODE, **question,
                                   "mcq_answer": {"direct": None, "refute": None}})


def mcq_record_from_state(item: Item, question: dict[str, Any], state: dict[str, Any], *, run_id: str, backend: str,
                          model: str, elapsed_s: float) -> Record:
    """The record of one answered question: the score record's trajectory fields, the question's
    fields (``question_id``, ``image``, ``dataset``, ``question_type``, ``answer``, ``question``,
    ``options``) and each branch's letter in ``mcq_answer`` (None when it gave none), with the
    refutation's per-option confidences in ``option_scores``."""
    rec = record_from_state(item, state, run_id=run_id, backend=backend, model=model, elapsed_s=elapsed_s)
    answers = {"direct": state.get("direct_answer"), "refute": state.get("refute_answer")}
    error = None
    if answers["direct"] is None and answers["refute"] is None:
        error = "both branches gave no option letter: " + "; ".join(
            e for e in (state.get("direct_error"), state.get("refute_error")) if e)
    return rec.model_copy(update={
        "item_id": question["question_id"], "mode": MCQA_MODE, **question, "mcq_answer": answers,
        "option_scores": state.get("refute_option_scores"), "error": error,
        "mcq_agree": None if None in answers.values() else answers["direct"] == answers["refute"],
        "remaining_features": [c for c in state.get("candidates", []) if c.get("status") != "refuted"]})


def _plain_localization(value: Any) -> dict[str, Any] | None:
    """A state's ``localization`` without its PNG bytes (the runner writes those to files and
    puts their paths in ``map`` / ``expert_map``): records are JSON."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if not isinstance(v, (bytes, bytearray))}


# ------------------------------------------------------------------------------- writing

class RecordWriter:
    """Appends records to ``OUT/records.jsonl``, one line each, durable before it returns.

    Opening repairs a torn last line left by a killed run (:func:`repair_torn_tail`: a line that
    does not parse is dropped and its item redone; a complete one only gets its newline).
    ``secrets`` (an API key) are replaced by ``***`` in every value of every record, whatever put
    them there (an endpoint that echoes the key in a reply, an exception message), before the
    record is serialised; each line is checked to parse before it is written. Lines go straight
    to the file, unbuffered: a write that fails (disk full) is cut back to the last whole line, so
    the file always ends at a record boundary and nothing is left to flush at close. Thread-safe;
    usable as a context manager.
    """

    def __init__(self, out_dir: str | os.PathLike, *, fsync: bool = True, secrets: Iterable[str] = ()):
        self.path = Path(out_dir) / RECORDS_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_torn_tail(self.path)
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise OutputError(f"cannot write records to {self.path}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()
        self._fsync = fsync
        self._secrets = [s for s in secrets if s]

    def write(self, record: Record) -> None:
        """Append ``record`` (durable when this returns); raises :class:`RecordLineError` if its
        line would not read back as the record of its item, OSError if it cannot be written."""
        line = record.to_line(self._secrets)
        try:
            back = json.loads(line)
        except ValueError:
            back = None
        if not isinstance(back, dict) or not isinstance(back.get("item_id"), str) or "\n" in line:
            raise RecordLineError(f"the record of item {record.item_id[:200]!r} does not serialise to one "
                                  "JSON line; nothing was written for it")
        data = (line + "\n").encode("utf-8")
        with self._lock:
            fd = self._fh.fileno()
            start = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                if self._fsync:
                    os.fsync(fd)
            except OSError:
                try:  # leave no torn line behind: the file ends where the last record did
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise

    def close(self) -> None:
        """Close the file. Writes are unbuffered (a failed one was already cut back and reported
        by :meth:`write`), so nothing is pending; should closing still fail, it is logged, not
        raised."""
        with self._lock:
            if not self._fh.closed:
                try:
                    self._fh.close()
                except OSError as exc:
                    log.warning("%s: the last record could not be flushed on close (%s); --resume redoes "
                                "its item", self.path, exc.strerror or exc)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RecordLineError(AnomalyClawError):
    """A record whose JSON line would not read back (never written: a corrupt line is worse
    than none)."""


LOCK_FILE = ".run.lock"
try:
    import fcntl as _fcntl  # noqa: F401
    _HAS_FLOCK = True
except ImportError:  # not POSIX
    _HAS_FLOCK = False


class RunFolderBusyError(AnomalyClawError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, so two runs never append to one ``records.jsonl``.

    Held with ``flock`` on ``OUT/.run.lock`` (the kernel drops it when the process dies, even by
    SIGKILL, so a killed run never leaves a stale lock). A no-op where ``fcntl`` is missing.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self._fh: Any = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        writable_folder(self.path.parent, "run folder")
        if self.path.is_dir():
            raise OutputError(f"{self.path} is a folder, where the run's lock file belongs; remove it "
                              "(a run keeps nothing in it) and run again")
        try:
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the run's lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunFolderBusyError(
                f"another anomalyclaw run (pid {holder}) is writing to {self.path.parent}; wait for it to "
                "finish, or choose another --out folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now (always True where ``fcntl`` is missing)."""
        return self._fh is not None or not _HAS_FLOCK

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def repair_torn_tail(path: Path) -> int:
    """Make the last line of a JSON-lines file whole after a kill; returns bytes dropped.

    A last line without its newline that parses as a JSON object is a complete record whose
    newline was never written: it is kept and the newline added. Only a last line that does not
    parse (a torn write) is dropped, so that its item is redone.
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        # Walk back to the last newline; everything after it is the unterminated tail.
        pos, chunk = size, 4096
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            block = fh.read(pos - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        if keep == size:
            return 0
        fh.seek(keep)
        tail = fh.read()
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError, RecursionError):
            complete = False
        if complete:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            log.warning("%s: the last record had no newline; added it (the record is kept)", path)
            return 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        log.warning("%s: dropped a torn last line (%d bytes); that item will be redone", path, size - keep)
        return size - keep


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, object or None, problem) for each non-empty line of a JSON-lines file."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not valid JSON ({exc.msg})"
                continue
            except RecursionError:
                yield n, None, "not valid JSON (nested too deeply)"
                continue
            if not isinstance(obj, dict):
                yield n, None, "not a JSON object"
                continue
            yield n, obj, None


#: The kinds of record file a folder may hold; eval reads one kind per folder unless asked.
_KINDS = ("run records (records.jsonl)", "released arrays (D*.json)", "other JSON-lines files (*.jsonl)")


def record_files(path: str | os.PathLike, *, merge: bool = False) -> list[Path]:
    """The record files under ``path``: a file, or a folder's ``records.jsonl``, its released
    ``D*.json`` arrays, or its ``*.jsonl`` files.

    A folder that holds more than one of these kinds (a run's ``records.jsonl`` beside released
    arrays or other JSON-lines files) is refused with a ValueError naming them, unless
    ``merge``: reading them together would merge different runs by item id.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no records at {p}: expected a folder with records.jsonl or D*.json, or a file")
    run = [p / RECORDS_FILE] if (p / RECORDS_FILE).is_file() else []
    released = sorted((f for f in p.glob("D*.json") if f.is_file()), key=lambda f: _natural_key(f.stem))
    other = sorted(f for f in p.glob("*.jsonl") if f.is_file() and f.name != RECORDS_FILE)
    kinds = [(kind, files) for kind, files in zip(_KINDS, (run, released, other)) if files]
    if not kinds:
        raise FileNotFoundError(f"{p} holds no records (*.jsonl or released D*.json arrays)")
    if len(kinds) > 1 and not merge:
        listed = "; ".join(f"{kind}: {_names(files)}" for kind, files in kinds)
        raise ValueError(f"{p} mixes record files of different kinds ({listed}); reading them together would "
                         "merge different runs by item id. Name one file, or pass --merge to read them all "
                         "(an item in several files: the last file read wins, and eval counts it)")
    return [f for _, files in kinds for f in files]


def _names(files: list[Path], limit: int = 4) -> str:
    shown = ", ".join(f.name for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _natural_key(s: str) -> tuple:
    digits = "".join(c for c in s if c.isdigit())
    return (int(digits) if digits else 0, s)


@dataclass
class RecordsRead:
    """Everything a read of records found, so that nothing is lost without being counted.

    ``records`` holds one record per item id (the last one read wins). ``files`` lists each
    file read with its row count; ``unreadable`` each row that is no record at all (not JSON,
    not an object, no string ``item_id``) as ``(where, why)``, and ``bad_files`` each file that
    could not be read at all. ``invalid[file][field]`` lists ``(where, value)`` for every value
    in no accepted form (a label such as ``"yes"`` or ``2``, a score such as ``"NaN"`` or
    ``true``): the record is kept with that field null, so evaluation leaves the row out and
    says why. ``duplicates`` lists ``(item_id, where)`` for each record replaced by a later one.
    """

    records: list[Record] = field(default_factory=list)
    files: list[tuple[Path, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    invalid: dict[str, dict[str, list[tuple[str, Any]]]] = field(default_factory=dict)
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows found in all files, readable or not."""
        return sum(n for _, n in self.files)

    @property
    def n_invalid(self) -> int:
        return sum(len(v) for fields in self.invalid.values() for v in fields.values())

    @property
    def clean(self) -> bool:
        return not (self.unreadable or self.bad_files or self.invalid or self.duplicates)

    def messages(self) -> list[str]:
        """One line per kind of problem (per field and file for values), naming the first case."""
        out = [f"cannot read {f}: {why}" for f, why in self.bad_files]
        if self.unreadable:
            where, why = self.unreadable[0]
            out.append(f"{len(self.unreadable)} unreadable rows (first: {where}: {why})")
        for f, fields in self.invalid.items():
            for name, cases in fields.items():
                accepted = ACCEPTED_LABELS if name == "label_gt" else ACCEPTED_SCORES
                where, value = cases[0]
                out.append(f"{f}: {len(cases)} values of '{name}' not accepted, read as null (first: {where}: "
                           f"{show_value(value)}); accepted: {accepted}")
        if self.duplicates:
            item, where = self.duplicates[0]
            out.append(f"{len(self.duplicates)} records replaced by a later record of the same item "
                       f"(first: {item!r}, replaced at {where})")
        return out

    def to_json(self) -> dict[str, Any]:
        """The counts for a ``--json`` line: files with rows, unreadable rows (and files),
        values not accepted per file and field, duplicate records."""
        return {"files": [{"path": str(f), "rows": n} for f, n in self.files],
                "unreadable": len(self.unreadable),
                "unreadable_first": (": ".join(self.unreadable[0]) if self.unreadable else None),
                "unreadable_files": [{"path": str(f), "why": why} for f, why in self.bad_files],
                "invalid_values": {f: {name: len(v) for name, v in fields.items()} for f, fields in self.invalid.items()},
                "duplicates": len(self.duplicates)}


def read_records(path: str | os.PathLike, *, merge: bool = False) -> RecordsRead:
    """Read every record under ``path`` (this project's JSON lines or released arrays), losing
    nothing without counting it (see :class:`RecordsRead`). ``merge`` allows a folder that
    mixes kinds of record file (:func:`record_files`)."""
    out = RecordsRead()
    by_id: dict[str, Record] = {}
    for f in record_files(path, merge=merge):
        try:
            rows = list(iter_rows(f))
        except (OSError, ValueError) as exc:
            out.bad_files.append((f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            out.files.append((f, 0))
            continue
        out.files.append((f, len(rows)))
        for where, obj, problem in rows:
            rec, problems, problem = (None, [], problem) if problem else _validate(obj)
            if problem:
                out.unreadable.append((where, problem))
                continue
            for name, value in problems:
                out.invalid.setdefault(str(f), {}).setdefault(name, []).append((where, value))
            if rec.item_id in by_id:
                out.duplicates.append((rec.item_id, where))
            by_id[rec.item_id] = rec
    out.records = list(by_id.values())
    return out


def _validate(obj: dict[str, Any]) -> tuple[Record | None, list[tuple[str, Any]], str | None]:
    """(record, values not accepted as (field, value), why unreadable). A field whose value has
    the wrong type for the schema is counted and read as its default; only a row without a
    string ``item_id`` (or one the schema still refuses) is unreadable."""
    item_id = obj.get("item_id")
    if not isinstance(item_id, str) or not item_id.strip():
        return None, [], f"no string item_id (got {show_value(item_id)})"
    data, dropped = dict(obj), []
    for _ in range(len(data) + 1):
        problems: list[tuple[str, Any]] = []
        try:
            return Record.model_validate(data, context={"problems": problems}), dropped + problems, None
        except ValidationError as exc:
            bad = {e["loc"][0] for e in exc.errors() if e["loc"] and e["loc"][0] in data and e["loc"][0] != "item_id"}
            if not bad:
                return None, [], f"not a valid record: {str(exc).splitlines()[0]}"
            for name in sorted(bad):
                dropped.append((name, data.pop(name)))
    return None, [], "not a valid record"


def load_records(path: str | os.PathLike, *, strict: bool = False, merge: bool = False) -> list[Record]:
    """The records under ``path`` (see :func:`read_records`): every problem found is logged as
    a warning, one line per kind; ``strict`` raises a ValueError naming the first instead."""
    read = read_records(path, merge=merge)
    for line in read.messages():
        if strict:
            raise ValueError(line)
        log.warning(line)
    return read.records


def iter_rows(f: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(where, object, why unreadable) per row of a records file; raises ValueError when a
    ``.json`` file is not a JSON array."""
    if f.suffix == ".jsonl":
        for n, obj, problem in iter_jsonl(f):
            yield f"{f}:{n}", obj, problem
        return
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON array of records, got a JSON {type(data).__name__}")
    for i, obj in enumerate(data):
        yield f"{f}[{i}]", obj if isinstance(obj, dict) else None, None if isinstance(obj, dict) else "not a JSON object"


def finished_ids(out_dir: str | os.PathLike) -> set[str]:
    """Ids already recorded in ``OUT/records.jsonl`` (for --resume); a torn tail does not count."""
    path = Path(out_dir) / RECORDS_FILE
    if not path.exists():
        return set()
    return {obj["item_id"] for _, obj, problem in iter_jsonl(path)
            if not problem and isinstance(obj.get("item_id"), str)}


def write_records(records: Iterable[Record], out_dir: str | os.PathLike) -> Path:
    with RecordWriter(out_dir, fsync=False) as w:
        for r in records:
            w.write(r)
    return w.path


def drop_error_records(out_dir: str | os.PathLike) -> int:
    """Rewrite ``OUT/records.jsonl`` without its error records (atomically); returns how many
    were dropped, so that ``--resume --retry-errors`` judges those items again, once each."""
    path = Path(out_dir) / RECORDS_FILE
    if not path.exists():
        return 0
    repair_torn_tail(path)
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                dropped += 1
                continue
            if isinstance(obj, dict) and obj.get("error"):
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        write_atomic(path, "".join(keep), fsync=True)
    return dropped
