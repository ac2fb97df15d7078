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
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.items import Item

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SCHEMA_VERSION = 1


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
    """The fused score: w_direct*direct_score + w_v9*refute_score (+ w_expert*expert_score)."""
    direct_score: float | None = None
    refute_score: float | None = None
    v9_score: float | None = None
    """The released name of the refutation score; kept equal to ``refute_score``."""
    v9_initial_score: float | None = None
    v9_updated_score: float | None = None
    expert_score: float | None = None
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

    @field_validator("anomaly_score", "direct_score", "refute_score", "v9_score", "v9_initial_score",
                     "v9_updated_score", "expert_score", "confidence", mode="before")
    @classmethod
    def _finite_or_none(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            return None
        return v

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

    def to_line(self) -> str:
        """The record as one line of strict JSON (no NaN). Values a tool left as NumPy scalars or
        arrays, or as non-finite floats, are written as plain numbers, lists or null."""
        try:
            return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, allow_nan=False)
        except (PydanticSerializationError, ValueError):
            return json.dumps(_plain(self.model_dump(mode="python")), ensure_ascii=False, allow_nan=False)


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
        expert_score=state.get("expert_score"),
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


# ------------------------------------------------------------------------------- writing

class RecordWriter:
    """Appends records to ``OUT/records.jsonl``, one line each, durable before it returns.

    Opening repairs a torn last line left by a killed run (it is dropped; the item is redone).
    ``secrets`` (an API key) are replaced by ``***`` in every line, whatever put them there (an
    endpoint that echoes the key in a reply, an exception message). Thread-safe; usable as a
    context manager.
    """

    def __init__(self, out_dir: str | os.PathLike, *, fsync: bool = True, secrets: Iterable[str] = ()):
        self.path = Path(out_dir) / RECORDS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._fsync = fsync
        self._secrets = [s for s in secrets if s]

    def write(self, record: Record) -> None:
        line = record.to_line()
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "***")
        line += "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


LOCK_FILE = ".run.lock"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
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

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def repair_torn_tail(path: Path) -> int:
    """Drop a partial last line (no newline) that a kill left behind; returns bytes dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        # Walk back to the last newline; everything after it is a torn write.
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
        if keep < size:
            fh.truncate(keep)
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
            if not isinstance(obj, dict):
                yield n, None, "not a JSON object"
                continue
            yield n, obj, None


def record_files(path: str | os.PathLike) -> list[Path]:
    """The record files under ``path``: a file, or a folder's ``*.jsonl`` and ``D*.json``."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no records at {p}: expected a folder with records.jsonl or D*.json, or a file")
    files = sorted(p.glob("*.jsonl")) + sorted(p.glob("D*.json"), key=lambda f: _natural_key(f.stem))
    if not files:
        raise FileNotFoundError(f"{p} holds no records (*.jsonl or released D*.json arrays)")
    return files


def _natural_key(s: str) -> tuple:
    digits = "".join(c for c in s if c.isdigit())
    return (int(digits) if digits else 0, s)


def load_records(path: str | os.PathLike, *, strict: bool = False) -> list[Record]:
    """Read every record under ``path`` (this project's JSON lines or released arrays).

    A line that is not a record is skipped with a warning naming file and line (``strict``
    raises instead). When an item appears more than once, the last record wins.
    """
    by_id: dict[str, Record] = {}
    for f in record_files(path):
        for where, obj in _iter_objects(f, strict):
            try:
                rec = Record.model_validate(obj)
            except ValueError as exc:
                msg = f"{where}: not a valid record: {str(exc).splitlines()[0]}"
                if strict:
                    raise ValueError(msg) from None
                log.warning(msg)
                continue
            by_id[rec.item_id] = rec
    return list(by_id.values())


def _iter_objects(f: Path, strict: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    if f.suffix == ".jsonl":
        for n, obj, problem in iter_jsonl(f):
            if problem:
                if strict:
                    raise ValueError(f"{f}:{n}: {problem}")
                log.warning("%s:%d: %s; skipped", f, n, problem)
                continue
            yield f"{f}:{n}", obj
        return
    data = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{f}: expected a JSON array of records")
    for i, obj in enumerate(data):
        yield f"{f}[{i}]", obj


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
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(obj, dict) and obj.get("error"):
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return dropped
