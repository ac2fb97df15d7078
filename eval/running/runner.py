"""The batch runner: every item of a manifest through the pipeline, one durable record each.

Async, with one bound on concurrent VLM requests (held by the VLM object the whole run shares;
a free slot goes to the waiting request of the item started earliest, :mod:`anomalyclaw.priority`);
both branches of an item run at once; records are appended as each item finishes, so a run
killed at any moment loses nothing finished, and ``resume`` skips what is recorded. A corrupt
image, a failing tool or a flaky endpoint costs one item an error record, never the run; an
endpoint that refuses every request (401/403/404), or a records file that cannot be written,
stops the run at once. One record per item id (a repeated id is judged once), one run per folder
at a time (a lock), and the API key is blanked from everything the run writes.

A run folder keeps the fingerprint of what shapes its records (``fingerprint.json``: the
manifest and its content hash, split, domains, backend, model, prompts, tools, max turns, fusion
weights, package version); a resume with a different one is refused unless forced, so one
records file never mixes two runs. :meth:`Runner.request_stop` (what SIGINT and SIGTERM call
under :func:`run_sync`) stops taking items, abandons the ones in flight (a resume redoes them)
and still writes the summary.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import dataclasses
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, ContextManager, Sequence, TypeVar

from anomalyclaw.cache import cache_stats
from anomalyclaw.config import AgentConfig, redact, redact_value
from anomalyclaw.errors import (AnomalyClawError, EndpointFatalError, ImageLoadError, OutputError,
                                RunMismatchError)
from anomalyclaw.experts.pool import default_pool
from anomalyclaw.items import Item
from anomalyclaw.loops import run_loop, running_loop_kind
from anomalyclaw.paths import safe_file_name, writable_folder, write_atomic
from anomalyclaw.priority import item_order
from anomalyclaw.threads import frozen_heap, intra_op_threads, limit_compute_threads, to_compute_thread
from anomalyclaw.version import __version__, library_versions
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.images import ImageEncoder
from anomalyclaw.graph.messages import warm_images
from anomalyclaw.graph.pipeline import shared_pipeline
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.toolcalling import ToolCalling
from anomalyclaw.graph.vlm.seam import VLM
from anomalyclaw.prompts import PromptSet
from anomalyclaw.tools.registry import ToolRegistry

from anomalyclaw.eval.running.records import (LOCK_FILE, RECORDS_FILE, Record, RecordLineError, RecordWriter, RunLock,
                                              drop_error_records, error_record, finished_ids, now, record_from_state)

log = logging.getLogger(__name__)


FINGERPRINT_FILE = "fingerprint.json"
#: The fingerprint's list of forced resumes (what differed, when); not a setting.
FORCED_RESUMES = "forced_resumes"

J = TypeVar("J")


class RecordWriteError(OutputError):
    """A record could not be appended to the run's records file."""


@dataclass
class RunSummary:
    """What a run did; ``fatal`` is set when the endpoint stopped it."""

    out_dir: str
    n_items: int = 0
    n_done: int = 0
    n_skipped: int = 0
    n_errors: int = 0
    """Records with ``error`` set (no score), rejected manifest entries included."""
    n_partial: int = 0
    """Records with a score from one branch only (the other's failure is in its ``*_error``)."""
    n_rejected: int = 0
    n_duplicates: int = 0
    """Items left out because an earlier item has the same id (one record per id)."""
    elapsed_s: float = 0.0
    items_per_s: float = 0.0
    requests: int = 0
    request_bytes: int = 0
    fatal: str | None = None
    interrupted: str | None = None
    """The signal that stopped the run early (``SIGINT``, ``SIGTERM``), if one did."""
    n_abandoned: int = 0
    """Items in flight when the run was stopped: no record, a resume judges them."""
    cache: dict[str, Any] = field(default_factory=dict)
    tool_calling: str = "json"
    """How tools were called: json, native, or auto and whether it fell back to JSON (and why)."""
    replicas: list[dict[str, Any]] = field(default_factory=list)
    """Per endpoint replica: ``url``, ``requests``, ``errors``, ``ok``, latency mean / p50 / p95
    of successful requests, ``rests``, ``state`` (empty for a backend without replicas)."""
    workers: dict[str, Any] = field(default_factory=dict)
    """With ``--workers``/``--ray``: ``kind`` (processes or ray), ``n``, each one's ``concurrency``,
    ``respawns`` (dead workers replaced) and the workers' ``cpu_s`` (empty for one process)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAPS_FOLDER = "maps"


def _save_maps(out_dir: Path, item: Item, state: dict[str, Any], save: bool) -> None:
    """Replace the PNG bytes of ``state["localization"]`` by files: the agent's map at
    ``OUT/maps/<safe id>.png``, the expert's at ``OUT/maps/expert/<safe id>.png`` (paths kept
    relative to OUT in ``map`` / ``expert_map``; None when ``save`` is off)."""
    loc = state.get("localization")
    if not isinstance(loc, dict):
        return
    loc = dict(loc)
    agent_png, expert_png = loc.pop("map_png", None), loc.pop("expert_map_png", None)
    loc["map"] = loc["expert_map"] = None
    if save and agent_png:
        start = time.perf_counter()
        name = safe_file_name(item.item_id, suffix=".png")
        try:
            write_atomic(out_dir / MAPS_FOLDER / name, agent_png)
            loc["map"] = f"{MAPS_FOLDER}/{name}"
            if expert_png:
                write_atomic(out_dir / MAPS_FOLDER / "expert" / name, expert_png)
                loc["expert_map"] = f"{MAPS_FOLDER}/expert/{name}"
        except OSError as exc:  # the scores and boxes stand without the files
            state["fallbacks"] = list(state.get("fallbacks") or []) + [f"anomaly map not written: {exc}"]
        loc["map_bytes"] = len(agent_png) + len(expert_png or b"")
        loc["write_s"] = round(time.perf_counter() - start, 4)
    state["localization"] = loc


def _save_observation_images(out_dir: Path, item: Item, state: dict[str, Any]) -> None:
    """Write each observation's images under OUT/images/<item>/ and list them in the history.

    Folder and file names are :func:`~anomalyclaw.paths.safe_file_name`: an item id from a
    manifest can neither write outside OUT (``../x``) nor share another item's folder (``a/b``
    beside ``a_b``)."""
    folder = out_dir / "images" / safe_file_name(item.item_id)
    turn_rows = [h for h in state.get("history", []) if h.get("stage") == "refute"]
    for k, obs in enumerate(state.get("observations", [])):
        paths = []
        for im in obs.get("images", []):
            ext = "png" if im["data"][:4] == b"\x89PNG" else "jpg"
            p = folder / safe_file_name(f"obs{k + 1}_{obs['tool']}_{im['name']}", suffix=f".{ext}")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(im["data"])
            paths.append(str(p.relative_to(out_dir)))
        if k < len(turn_rows):
            turn_rows[k]["images"] = paths


def default_item_concurrency(vlm_slots: int) -> int:
    """Items in flight for ``vlm_slots`` concurrent VLM requests: enough to keep every slot busy
    while some items run tools."""
    return max(2, int(vlm_slots * 1.5) + 1)


class Runner:
    """Runs items through one compiled pipeline with shared VLM, tools, experts and encoder."""

    def __init__(self, vlm: VLM, *, out_dir: str | os.PathLike, config: AgentConfig | None = None,
                 registry: ToolRegistry | None = None, prompts: PromptSet | None = None,
                 expert_pool: Any = None, score_cache: Any = None, item_concurrency: int | None = None,
                 item_timeout_s: float | None = 900.0, save_images: bool = False, save_maps: bool = True,
                 threshold: float | None = None, progress: bool = True,
                 secrets: Sequence[str] = (), source: str | None = None, inputs: dict[str, Any] | None = None,
                 command: Sequence[str] | None = None):
        self.vlm = vlm
        self.source = source
        """Where the items came from (the manifest), written into ``run_*.json``."""
        self.inputs = dict(inputs or {})
        """What chose the items (``manifest``, ``manifest_sha256``, ``split``, ``domains``): part
        of the run folder's fingerprint."""
        self.command = list(command) if command is not None else None
        """The command line that started the run, kept in ``run_*.json`` (secrets blanked)."""
        self.out_dir = Path(out_dir)
        self.config = config or AgentConfig()
        self.registry = registry or ToolRegistry.default()
        self.prompts = prompts or PromptSet.load()
        self.expert_pool = expert_pool or default_pool(self.config.backbone, self.config.backbone_path,
                                                       self.config.device)
        self.score_cache = score_cache
        vlm_slots = getattr(vlm, "max_concurrency", 2)
        self.item_concurrency = item_concurrency or default_item_concurrency(vlm_slots)
        self.item_timeout_s = item_timeout_s
        self.save_images = save_images
        self.save_maps = save_maps
        """Write each item's anomaly maps under ``OUT/maps`` (the boxes are recorded either way)."""
        if not save_maps and self.config.anomaly_maps:  # nothing would keep them: do not encode them
            self.config = dataclasses.replace(self.config, anomaly_maps=False)
        self.threshold = threshold
        """The image threshold: records get ``label_pred`` = anomaly_score >= threshold."""
        self.progress = progress
        self.secrets = [s for s in secrets if s]
        self.encoder = ImageEncoder()
        self.tool_calling = ToolCalling(self.config.tool_calling)
        """Shared by the run's items: under ``auto``, the first refusal of tools switches them all."""
        self.graph = shared_pipeline()
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.started_at = now()
        self.task = "score"
        self.extra_info: dict[str, Any] = {}
        """More settings for ``run_*.json`` (a subclass's: the MMAD file's references...)."""
        self._stop_reason: str | None = None
        self._stop_event: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What shapes this run's records; a resume must match it (see :meth:`run`)."""
        prompts = json.dumps(self.prompts.texts, sort_keys=True).encode("utf-8")
        fp = {**self.inputs, "backend": self.vlm.backend, "model": self.vlm.model,
              "prompts": hashlib.sha256(prompts).hexdigest()[:16], "tools": self.registry.names(),
              "max_turns": self.config.max_turns, "alpha": self.config.alpha,
              "expert_weight": self.config.expert_weight, "direct_score": self.config.direct_score,
              "backbone": self.config.backbone, "task": self.task, "version": __version__}
        if self.config.tool_calling != "json":  # (absent for json, so earlier folders keep their fingerprint)
            fp["tool_calling"] = self.config.tool_calling
        if self.threshold is not None:  # label_pred depends on it (absent without one, as before)
            fp["threshold"] = self.threshold
        return json.loads(json.dumps(fp, default=str))

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop the running :meth:`run` soon: no new items, the ones in flight abandoned (no
        record; a resume redoes them), the summary written. Safe from a signal handler or
        another thread."""
        self._stop_reason = self._stop_reason or reason
        if self._stop_event is not None:
            loop, event = self._stop_event
            loop.call_soon_threadsafe(event.set)

    async def judge(self, item: Item) -> Record:
        """One item to one record; only :class:`EndpointFatalError` escapes."""
        start = time.perf_counter()
        kw = dict(run_id=self.run_id, backend=self.vlm.backend, model=self.vlm.model)

        def failed(reason: str) -> Record:
            return error_record(item, redact(reason, self.secrets)[:1000], elapsed_s=time.perf_counter() - start, **kw)

        if not item.ref_paths:
            return failed("no reference images: the item needs at least one normal reference (ref_paths is empty)")
        try:
            run = make_context(item, self.vlm, registry=self.registry, prompts=self.prompts, config=self.config,
                               expert_pool=self.expert_pool, score_cache=self.score_cache, encoder=self.encoder,
                               tool_calling=self.tool_calling)
            ctx = run.item_context
            # Decoding, ranking and encoding the first messages' images is CPU work: do it in a
            # worker thread so that the nodes on the event loop find it done.
            def prepare() -> None:
                ctx.preload()
                warm_images(run)

            await to_compute_thread(prepare)
        except ImageLoadError as exc:
            return failed(f"image: {exc}")
        except Exception as exc:  # one bad item must not stop the run
            log.exception("item %s: preparing its images failed", item.item_id)
            return failed(f"internal: {type(exc).__name__}: {exc}")
        try:
            state = await asyncio.wait_for(self.graph.ainvoke(new_state(item.item_id), context=run),
                                           timeout=self.item_timeout_s)

            # The files, then the record that names them, in one hop to a worker thread.
            def finish() -> Record:
                if self.save_images:
                    _save_observation_images(self.out_dir, item, state)
                _save_maps(self.out_dir, item, state, self.save_maps)
                return record_from_state(item, state, elapsed_s=time.perf_counter() - start, **kw)

            record = await to_compute_thread(finish)
            if self.threshold is not None:
                record.threshold = self.threshold
                if record.anomaly_score is not None:
                    record.label_pred = int(record.anomaly_score >= self.threshold)
            return record
        except EndpointFatalError:
            raise
        except asyncio.TimeoutError:
            return failed(f"timed out after {self.item_timeout_s:.0f} s (item_timeout_s)")
        except ImageLoadError as exc:
            return failed(f"image: {exc}")
        except Exception as exc:  # one bad item must not stop the run
            log.exception("item %s failed", item.item_id)
            return failed(f"internal: {type(exc).__name__}: {exc}")

    async def run(self, items: Sequence[Item], *, rejected: dict[str, list[str]] | None = None,
                  resume: bool = False, retry_errors: bool = False, force: bool = False,
                  replace: bool = False, lock: RunLock | None = None, duplicates: int = 0) -> RunSummary:
        """Judge ``items`` (and write an error record for each ``rejected`` manifest entry).

        One record per item id: a later item with an id already seen is left out (counted in
        ``n_duplicates``, with the ``duplicates`` the caller already left out, such as a
        manifest's repeated entries). The run folder is locked for the run's duration; a caller
        that took the folder's lock first (to clear the folder under it) passes it as ``lock``.
        ``resume`` on a folder whose fingerprint differs raises :class:`RunMismatchError` naming
        the fields, unless ``force``. ``replace`` starts afresh in a folder that an earlier run of
        the same ``inputs["kind"]`` wrote (``anomalyclaw predict`` does): its records, images and
        run files are removed under the lock; a folder of any other run is refused.
        """
        writable_folder(self.out_dir, "run folder")
        if lock is not None:
            if not lock.held or lock.path.resolve() != (self.out_dir / LOCK_FILE).resolve():
                raise ValueError(f"lock {lock.path} is not a held lock of the run folder {self.out_dir}")
            if replace:
                self._clear_folder()
            return await self._run_locked(items, rejected or {}, resume, retry_errors, duplicates, force)
        with RunLock(self.out_dir):
            if replace:
                self._clear_folder()
            return await self._run_locked(items, rejected or {}, resume, retry_errors, duplicates, force)

    def _clear_folder(self) -> None:
        records_path = self.out_dir / RECORDS_FILE
        kind = self.inputs.get("kind")
        if records_path.exists():
            old = read_fingerprint(self.out_dir) or {}
            if kind is None or old.get("kind") != kind:
                made_by = f"anomalyclaw {old['kind']}" if old.get("kind") else "a run"
                raise AnomalyClawError(f"{self.out_dir} holds the records of {made_by}, which this would replace; "
                                       "choose another --out folder")
        try:
            records_path.unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "images", ignore_errors=True)
            for stale in self.out_dir.glob("run_*.json"):
                stale.unlink()
        except OSError as exc:
            raise OutputError(f"cannot clear {self.out_dir}: {exc.strerror or exc}") from None

    def _check_fingerprint(self, resume: bool, force: bool) -> None:
        """Refuse a resume whose settings differ from the folder's (unless ``force``); a new run
        writes its fingerprint. The folder's fingerprint stays that of its first records: a
        forced resume is noted in it (``forced_resumes``: when, and what differed), never adopted,
        so the next resume is checked against the same settings again."""
        path = self.out_dir / FINGERPRINT_FILE
        records_path = self.out_dir / RECORDS_FILE
        new = self.fingerprint()
        if resume and records_path.exists() and records_path.stat().st_size > 0:
            old = read_fingerprint(self.out_dir)
            if old is None:
                log.warning("%s has no readable %s (an older version made it): cannot check that this resume "
                            "uses the same settings", self.out_dir, FINGERPRINT_FILE)
            else:
                forced = old.get(FORCED_RESUMES)
                forced = list(forced) if isinstance(forced, list) else []
                changed = fingerprint_changes({k: v for k, v in old.items() if k != FORCED_RESUMES}, new)
                if not changed:
                    return
                if not force:
                    raise RunMismatchError(
                        f"{self.out_dir} holds records made with other settings: {'; '.join(changed)}. A resume "
                        "would mix two runs in one records file: choose another --out folder, or add --force to "
                        "resume anyway")
                log.warning("resuming %s with other settings (--force): %s", self.out_dir, "; ".join(changed))
                new = {**old, FORCED_RESUMES: [*forced, {"at": now(), "run_id": self.run_id, "changes": changed}]}
        try:
            write_atomic(path, json.dumps(new, indent=1))
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _open_folder(self, resume: bool, retry_errors: bool, force: bool, *, what: str) -> None:
        """Refuse a folder that holds records unless resuming, check its fingerprint, and with
        ``retry_errors`` drop the error records so that their ``what`` are redone."""
        records_path = self.out_dir / RECORDS_FILE
        if records_path.exists() and records_path.stat().st_size > 0 and not resume:
            raise AnomalyClawError(f"{records_path} exists: pass --resume to continue that run, or choose "
                                   "another --out folder")
        self._check_fingerprint(resume, force)
        if resume and retry_errors:
            dropped = drop_error_records(self.out_dir)
            if dropped:
                log.warning("redoing %d %s whose records were errors", dropped, what)

    async def _run_locked(self, items: Sequence[Item], rejected: dict[str, list[str]], resume: bool,
                          retry_errors: bool, duplicates: int = 0, force: bool = False) -> RunSummary:
        self._open_folder(resume, retry_errors, force, what="items")
        unique: dict[str, Item] = {}
        n_duplicates = max(0, int(duplicates))
        for it in items:
            if it.item_id in unique or it.item_id in rejected:
                n_duplicates += 1
                log.warning("item id %r appears more than once; only its first item is judged", it.item_id)
                continue
            unique[it.item_id] = it
        done = finished_ids(self.out_dir) if resume else set()
        summary = RunSummary(out_dir=str(self.out_dir), n_items=len(unique) + len(rejected),
                             n_duplicates=n_duplicates)
        todo = [it for it in unique.values() if it.item_id not in done]
        summary.n_skipped = len(unique) - len(todo)
        info_path = self._write_run_info(summary.n_items)
        start = time.perf_counter()
        with RecordWriter(self.out_dir, secrets=self.secrets) as writer:
            try:
                for rid, reasons in rejected.items():
                    if rid in done:
                        summary.n_skipped += 1
                        continue
                    record = Record(item_id=rid, error="manifest: " + "; ".join(reasons), run_id=self.run_id,
                                    backend=self.vlm.backend, model=self.vlm.model, finished_at=now())
                    self._write(writer, record)
                    summary.n_rejected += 1
                    summary.n_errors += 1
            except RecordWriteError as exc:
                summary.fatal = redact(str(exc), self.secrets)
            if summary.fatal is None:
                with self._compute_threads(), frozen_heap():
                    await self._run_queue(todo, writer, summary)
        summary.elapsed_s = round(time.perf_counter() - start, 3)
        summary.items_per_s = round(summary.n_done / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
        self._collect_stats(summary)
        try:
            self._write_run_info(summary.n_items, summary=summary, path=info_path)
        except OutputError as exc:  # the records are what matters, and they are already safe
            log.warning("the run summary was not written: %s", exc)
        return summary

    def _compute_threads(self) -> ContextManager[None]:
        """The libraries' intra-op threads while this process judges items: parallelism is across
        items, and one intra-op thread each avoids oversubscription."""
        return limit_compute_threads(intra_op_threads())

    def _collect_stats(self, summary: RunSummary) -> None:
        """The summary's cache, tool-calling and replica figures (a runner with worker
        processes adds up its workers' instead)."""
        summary.cache = {"experts": getattr(self.expert_pool, "stats", {}), **cache_stats()}
        summary.tool_calling = self.tool_calling.describe()
        summary.replicas = replica_summary(self.vlm)

    def _write(self, writer: RecordWriter, record: Record) -> None:
        """Append one record; a failed write (disk full, folder gone) stops the run, since
        judging items that cannot be recorded would only waste the endpoint's time."""
        try:
            try:
                writer.write(record)
            except RecordLineError as exc:  # keep the item's place: an error record instead
                keep = ("item_id", "domain_code", "domain", "category", "split", "label_gt", "anomaly_type_gt")
                writer.write(Record(**{k: getattr(record, k) for k in keep}, error=f"internal: {exc}",
                                    run_id=self.run_id, backend=self.vlm.backend, model=self.vlm.model,
                                    finished_at=now()))
        except OSError as exc:
            raise RecordWriteError(f"cannot append to {writer.path}: {exc}; fix that (free disk space?) and "
                                   "rerun with --resume: finished items are kept") from None

    async def _run_queue(self, todo: list[Item], writer: RecordWriter, summary: RunSummary) -> None:
        async def judge_item(item: Item, emit: Callable[[Record], Awaitable[None]]) -> None:
            await emit(await self.judge(item))

        await self._drive(todo, judge_item, writer, summary, size=lambda item: 1, unit="item")

    async def _drive(self, jobs: Sequence[J], handle: Callable[[J, Callable[[Record], Awaitable[None]]], Awaitable[None]],
                     writer: RecordWriter, summary: RunSummary, *, size: Callable[[J], int], unit: str,
                     concurrency: int | None = None) -> None:
        """Run ``handle(job, emit)`` for every job, ``concurrency`` (default ``item_concurrency``)
        at a time; ``handle`` calls ``await emit(record)`` for each of its ``size(job)`` records.
        A stop (:meth:`request_stop`) takes no new job and abandons the ones in flight, but a
        record whose write has begun is finished and counted, so the summary counts exactly the
        records on disk; ``n_abandoned`` is the records the jobs in flight still owed."""
        queue: asyncio.Queue[J] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(size(j) for j in jobs), unit=unit, desc="anomalyclaw" if self.task == "score" else f"anomalyclaw {self.task}",
                       dynamic_ncols=True)
        owed: dict[int, int] = {}  # job in flight -> records it has not written yet

        def counted(key: int, record: Record) -> None:
            summary.n_done += 1
            summary.n_errors += int(record.error is not None)
            summary.n_partial += int(record.error is None and bool(record.direct_error or record.refute_error))
            summary.requests += int(record.usage.get("requests", 0))
            summary.request_bytes += int(record.usage.get("request_bytes", 0))
            owed[key] -= 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(errors=summary.n_errors, refresh=False)

        async def emit(key: int, record: Record) -> None:
            # The write ends in an fsync (milliseconds): keep it off the event loop.
            write = asyncio.ensure_future(asyncio.to_thread(self._write, writer, record))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Stopped while its record was being written: the write finishes anyway,
                # so wait for it and count it.
                await asyncio.wait({write})
                if not write.cancelled() and write.exception() is None:
                    counted(key, record)
                raise
            counted(key, record)

        started = itertools.count()

        async def worker() -> None:
            while self._stop_reason is None:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                key = id(job)
                owed[key] = size(job)
                with item_order(next(started)):  # its requests wait behind those of older jobs only
                    await handle(job, functools.partial(emit, key))
                del owed[key]

        workers = [asyncio.create_task(worker())
                   for _ in range(min(concurrency or self.item_concurrency, max(1, len(jobs))))]
        stop = asyncio.Event()
        self._stop_event = (asyncio.get_running_loop(), stop)
        if self._stop_reason is not None:
            stop.set()
        stopper = asyncio.create_task(stop.wait())
        everything = asyncio.gather(*workers)
        try:
            await asyncio.wait({everything, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if everything.done():
                everything.result()  # raises what stopped a worker
            else:  # a stop was requested: abandon the jobs in flight
                summary.interrupted = self._stop_reason
                for w in workers:
                    w.cancel()
                # Each worker, not the gather of them: a gather ends at the first cancelled worker,
                # before one still finishing its record's write has counted it.
                await asyncio.gather(*workers, return_exceptions=True)
                await asyncio.gather(everything, return_exceptions=True)  # collect its outcome too
                summary.n_abandoned = sum(owed.values())
        except (EndpointFatalError, RecordWriteError) as exc:
            summary.fatal = redact(str(exc), self.secrets)
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            stopper.cancel()
            self._stop_event = None
            self._stop_reason = None
            if bar is not None:
                bar.close()

    def _write_run_info(self, n_items: int, *, summary: RunSummary | None = None,
                        path: Path | None = None) -> Path:
        """``OUT/run_<run_id>.json``: settings at the start, plus the summary at the end (no
        secrets: the endpoint's key never reaches the config or the summary)."""
        if path is None:
            path = self.out_dir / f"run_{self.run_id}.json"
            n = 1
            while path.exists():  # a resume within the same second keeps the earlier run's file
                n += 1
                path = self.out_dir / f"run_{self.run_id}-{n}.json"
        info = {"run_id": self.run_id, "started_at": self.started_at, "source": self.source, "n_items": n_items,
                "version": __version__, "libraries": library_versions(), "command": self.command,
                "backend": self.vlm.backend,
                "model": self.vlm.model, "config": asdict(self.config), "prompts": self.prompts.source,
                "tools": self.registry.names(), "task": self.task, "fingerprint": self.fingerprint(),
                "save_maps": self.save_maps, "threshold": self.threshold, "event_loop": running_loop_kind(),
                **self.extra_info}
        if summary is not None:
            info.update(finished_at=now(), summary=summary.to_json())
        text = json.dumps(redact_value(json.loads(json.dumps(info, default=str)), self.secrets), indent=1)
        try:
            write_atomic(path, text)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path


def run_sync(runner: Runner, items: Sequence[Item], *, handle_signals: bool = False, loop: str | None = None,
             **run_kw: Any) -> RunSummary:
    """``runner.run(items, **run_kw)`` in a new event loop, closing the VLM's connections of
    that loop at the end (they cannot serve another loop). ``loop``: its kind, ``auto``
    (uvloop where installed), ``uvloop`` or ``asyncio`` (:mod:`anomalyclaw.loops`; None:
    ``ANOMALYCLAW_LOOP``, else ``auto``).

    ``handle_signals`` (the command line's choice; main thread only): SIGINT and SIGTERM call
    :meth:`Runner.request_stop`, so the run ends with its summary (``interrupted`` names the
    signal) instead of dying mid-way; the process's own handlers are restored afterwards.
    """
    signals = [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None]
    handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
    # A signal the process was told to ignore (a background job's SIGINT) stays ignored.
    previous = {s: h for s in signals if (h := signal.getsignal(s)) != signal.SIG_IGN} if handle_signals else {}

    async def run_and_close() -> RunSummary:
        loop = asyncio.get_running_loop()
        for sig in previous:
            try:
                loop.add_signal_handler(sig, runner.request_stop, signal.Signals(sig).name)
            except (NotImplementedError, RuntimeError, ValueError):  # not on this platform
                pass
        try:
            return await runner.run(items, **run_kw)
        finally:
            for sig in previous:
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            close = getattr(runner.vlm, "aclose", None)
            if close is not None:
                await close()

    try:
        return run_loop(run_and_close(), loop=loop)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def replica_summary(vlm: Any) -> list[dict[str, Any]]:
    """The VLM's per-replica stats as a summary keeps them (no raw latencies), or []."""
    from anomalyclaw.graph.vlm.replicas import without_latencies

    stats = getattr(vlm, "replica_stats", None)
    return without_latencies(stats()) if callable(stats) else []


def read_fingerprint(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint a run folder holds (``None`` when it has none, or an unreadable one)."""
    path = Path(out_dir) / FINGERPRINT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field 'old' -> 'new'`` for each field whose value differs (long values shortened)."""
    def show(value: Any) -> str:
        text = json.dumps(value) if value is not None else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{key} {show(old.get(key))} -> {show(new.get(key))}"
            for key in list(dict.fromkeys([*old, *new])) if old.get(key) != new.get(key)]


def _error_kind(message: str) -> str:
    """An error message with what varies per item (paths, item ids, numbers) blanked, so that
    the same reason counts once."""
    text = re.sub(r"(?:[A-Za-z]:)?(?:/|\\)[^\s'\":;,()]+", "<path>", message)
    text = re.sub(r"'[^']*'", "'...'", text)
    return re.sub(r"\d+(?:\.\d+)?", "N", text)[:200]


def top_errors(records: Sequence[Record], n: int = 3) -> list[tuple[int, str]]:
    """The ``n`` most common error reasons among ``records``: (count, one example message)."""
    examples: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for rec in records:
        if rec.error:
            kind = _error_kind(rec.error)
            counts[kind] += 1
            examples.setdefault(kind, rec.error)
    return [(count, examples[kind]) for kind, count in counts.most_common(n)]


def run_items(items: Sequence[Item], vlm: VLM, out_dir: str | os.PathLike, **kwargs: Any) -> RunSummary:
    """Synchronous convenience: ``Runner(vlm, out_dir=..., **kwargs).run(items)`` in a new loop."""
    run_kw = {k: kwargs.pop(k) for k in ("rejected", "resume", "retry_errors", "lock", "duplicates") if k in kwargs}
    return run_sync(Runner(vlm, out_dir=out_dir, **kwargs), items, **run_kw)
