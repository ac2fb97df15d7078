"""Past one process: the runner's items judged by worker processes (``run --workers N``) or by
Ray actors (``run --ray [ADDRESS]``), the parent the one writer of ``OUT/records.jsonl``.

One event loop is one GIL: past ~10 items/s the runner's CPU, not the endpoint, is the ceiling.
:class:`ShardedRunner` keeps everything a run folder promises (the lock, the fingerprint, resume,
the summary) in the parent and hands the items out in small batches: each category's items
together, the batches in one contiguous shard per worker, each worker taking its own shard's
front as it has a free slot and, once it is done, the back of the fullest other one (work
stealing: a fast worker takes more; :class:`Shards`), so that each worker warms the caches of
its share of the reference sets, not of all of them. Each worker is a whole
:class:`~anomalyclaw.eval.running.runner.Runner` of its own (its event loop, VLM client with its
share of ``--concurrency``, tools, experts, caches) built from a picklable :class:`WorkerSpec`; it
sends each finished record back, and only the parent writes it, so a record is on disk once or
not at all:

- a worker that dies (SIGKILL, out of memory) loses only its unfinished items: they are judged
  again, each alone on another worker (a fresh one replaces the dead); an item whose worker dies
  twice while judging it alone gets an error record saying so (``--resume --retry-errors`` tries
  it again) instead of killing worker after worker;
- a parent that dies leaves the records it wrote; its workers see their pipe close and exit;
  ``--resume`` judges what has no record;
- SIGINT/SIGTERM stop the parent as a single-process run stops (no new batch, the ones in flight
  abandoned, the summary written); the workers ignore SIGINT (a terminal's Ctrl-C reaches the
  whole process group) and are stopped by the parent.

Ray is imported only for ``--ray`` (``pip install anomalyclaw[ray]``).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import os
import queue as queue_mod
import signal
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Awaitable, Callable, ContextManager, Sequence

from anomalyclaw.cache import cache_stats
from anomalyclaw.config import AgentConfig, EndpointConfig, redact
from anomalyclaw.errors import AnomalyClawError, EndpointFatalError
from anomalyclaw.items import Item
from anomalyclaw.loops import run_loop, running_loop_kind
from anomalyclaw.priority import item_order
from anomalyclaw.prompts import PromptSet
from anomalyclaw.threads import default_compute_slots, set_compute_slots

from anomalyclaw.eval.running.forkserver import worker_context
from anomalyclaw.eval.running.records import Record, RecordWriter, error_record
from anomalyclaw.eval.running.runner import RunSummary, Runner, default_item_concurrency

log = logging.getLogger(__name__)

#: How long the parent waits for a worker's goodbye (its last stats) before stopping it.
CLOSE_WAIT_S = 10.0
#: Batches a worker holds at once: one being judged while the next waits, and one more.
SLOTS_PER_WORKER = 3
#: Replacements for dead workers in one run before the run gives up (``workers x`` this).
RESPAWNS_PER_WORKER = 4


class WorkerLost(Exception):
    """The worker judging a batch died before finishing it."""


class WorkerStartError(EndpointFatalError):
    """Workers cannot be started (or keep dying): like an endpoint that refuses every request,
    it stops the run, finished records kept."""


@dataclasses.dataclass
class WorkerSpec:
    """Everything a worker needs to build the parent's runner again (picklable: no clients)."""

    backend: str
    endpoint: EndpointConfig | None
    concurrency: int
    """This worker's share of ``--concurrency`` (VLM requests in flight)."""
    config: AgentConfig
    tools: list[str]
    prompts: PromptSet
    out_dir: str
    run_id: str
    save_images: bool = False
    save_maps: bool = True
    threshold: float | None = None
    item_timeout_s: float | None = 900.0
    secrets: list[str] = dataclasses.field(default_factory=list, repr=False)
    compute_slots: int | None = None
    """Threads that may compute at once in the worker (:func:`~anomalyclaw.threads.set_compute_slots`;
    None: the default for a whole machine)."""
    event_loop: str | None = None
    """The kind of event loop a worker process runs on (:mod:`anomalyclaw.loops`: the parent's;
    None: the default). A Ray actor runs on the loop Ray makes for it (uvloop where installed)."""

    def build(self) -> Runner:
        """The worker's runner (in the worker: it also sets the process's compute slots)."""
        from anomalyclaw.graph.vlm import make_vlm
        from anomalyclaw.tools.registry import ToolRegistry

        if self.compute_slots:
            set_compute_slots(self.compute_slots)

        vlm = make_vlm(self.backend, self.endpoint, max_concurrency=self.concurrency)
        registry = ToolRegistry.default()
        for name in registry.names():
            if name not in self.tools:
                registry.drop(name)
        runner = Runner(vlm, out_dir=self.out_dir, config=self.config, registry=registry, prompts=self.prompts,
                        item_timeout_s=self.item_timeout_s, save_images=self.save_images, save_maps=self.save_maps,
                        threshold=self.threshold, progress=False, secrets=self.secrets)
        runner.run_id = self.run_id
        runner._built_cpu_s = time.process_time()  # what a worker reports is its CPU from here on
        return runner


def split_concurrency(total: int, n: int) -> list[int]:
    """``total`` requests in flight (``--concurrency``) shared by ``n`` workers, as evenly as whole
    numbers allow; ValueError when some worker would get none."""
    if total < n:
        raise ValueError(f"--concurrency {total} is below --workers {n}: each worker needs at least one "
                         "request in flight (raise --concurrency or lower --workers)")
    return [total // n + (1 if k < total % n else 0) for k in range(n)]


def worker_snapshot(runner: Runner) -> dict[str, Any]:
    """What a worker reports after each batch: its CPU time since its runner was built (imports
    and start-up left out), replica stats (with latencies, so the parent can pool them), cache
    counters, and why ``--tool-calling auto`` fell back to JSON there (None while it has not)."""
    stats = getattr(runner.vlm, "replica_stats", None)
    return {"pid": os.getpid(), "cpu_s": time.process_time() - getattr(runner, "_built_cpu_s", 0.0),
            "replicas": stats() if callable(stats) else [],
            "cache": {"experts": dict(getattr(runner.expert_pool, "stats", {}) or {}), **cache_stats()},
            "tool_calling_fallback": runner.tool_calling.fallback, "event_loop": running_loop_kind()}


class _BatchJudge:
    """A worker's side: judges batches on its runner, at most ``item_concurrency`` items at once."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._slots: asyncio.Semaphore | None = None
        self._started = itertools.count()

    async def judge(self, items: Sequence[Item], send: Callable[[Record], None]) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.runner.item_concurrency)

        async def one(item: Item) -> None:
            async with self._slots:
                with item_order(next(self._started)):  # as the runner orders its own items' requests
                    send(await self.runner.judge(item))

        tasks = [asyncio.ensure_future(one(it)) for it in items]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()


# ------------------------------------------------------------------------- worker processes

def _process_main(conn: Any, spec: WorkerSpec) -> None:
    """A worker process: batches in, records out, over its own pipe (a pipe per worker, so a
    worker killed mid-message garbles nobody else's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a run stops
    out: queue_mod.Queue = queue_mod.Queue()

    def sender() -> None:  # pickling and sending off the event loop, in order
        while True:
            msg = out.get()
            if msg is None:
                return
            try:
                conn.send(msg)
            except (OSError, EOFError):  # the parent is gone
                os._exit(0)

    threading.Thread(target=sender, name="anomalyclaw-worker-send", daemon=True).start()
    try:
        from anomalyclaw.config import install_secret_redaction
        from anomalyclaw.threads import frozen_heap, limit_compute_threads

        install_secret_redaction(spec.secrets)
        runner = spec.build()
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which stops the run)
        out.put(("fatal", f"worker {os.getpid()} could not start: {type(exc).__name__}: {exc}"))
        out.put(None)
        time.sleep(1.0)
        return
    with limit_compute_threads(1), frozen_heap():
        run_loop(_serve(conn, runner, out), loop=spec.event_loop)
    out.put(None)
    time.sleep(0.2)


async def _serve(conn: Any, runner: Runner, out: queue_mod.Queue) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (OSError, EOFError):  # the parent died or closed the pipe: stop at once
                os._exit(0)
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg[0] == "close":
                return

    threading.Thread(target=reader, name="anomalyclaw-worker-recv", daemon=True).start()
    judge = _BatchJudge(runner)
    tasks: set[asyncio.Task] = set()

    async def batch(bid: int, items: list[Item]) -> None:
        try:
            await judge.judge(items, lambda rec: out.put(("record", bid, rec)))
        except EndpointFatalError as exc:
            out.put(("fatal", redact(str(exc), runner.secrets)))
            return
        out.put(("done", bid, worker_snapshot(runner)))

    out.put(("ready", worker_snapshot(runner)))
    while True:
        msg = await inbox.get()
        if msg[0] == "batch":
            task = asyncio.create_task(batch(msg[1], msg[2]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif msg[0] == "close":
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            close = getattr(runner.vlm, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001
                    pass
            out.put(("bye", worker_snapshot(runner)))
            return


class _Proc:
    """The parent's handle of one worker process."""

    def __init__(self, index: int, process: Any, conn: Any):
        self.index, self.process, self.conn = index, process, conn
        self.alive = True
        self.exitcode: int | None = None
        self.batches: dict[int, asyncio.Queue] = {}
        self.send_lock = threading.Lock()
        self.goodbye = asyncio.Event()


class _SlotPool(ABC):
    """What both pools share: ``SLOTS_PER_WORKER`` slots per worker handed out by
    :meth:`acquire`, a dead worker replaced on its slot's next use (at most
    ``RESPAWNS_PER_WORKER`` times per worker in a run), and the workers' last reports."""

    flag = "--workers"
    dead = "worker processes"

    def __init__(self, n: int, specs: Sequence[WorkerSpec]):
        self.n = n
        self.specs = list(specs)
        self.snapshots: dict[tuple[int, int], dict[str, Any]] = {}
        self.respawns = 0
        self._slots: asyncio.Queue[int] = asyncio.Queue()

    def _open_slots(self, index: int) -> None:
        for _ in range(SLOTS_PER_WORKER):
            self._slots.put_nowait(index)

    @abstractmethod
    def _alive(self, index: int) -> bool:
        """Whether worker ``index`` can take a batch."""

    @abstractmethod
    async def _replace(self, index: int) -> None:
        """Start a new worker in place of dead worker ``index``."""

    def _last_exit(self, index: int) -> str:
        return ""

    async def acquire(self) -> int:
        index = await self._slots.get()
        if not self._alive(index):
            if self.respawns >= RESPAWNS_PER_WORKER * self.n:
                self._slots.put_nowait(index)
                raise WorkerStartError(f"{self.flag}: {self.dead} died {self.respawns} times in this run"
                                       f"{self._last_exit(index)}; stopping: finished items are kept")
            self.respawns += 1
            await self._replace(index)
        return index

    def release(self, index: int) -> None:
        self._slots.put_nowait(index)

    def worker_snapshots(self) -> list[dict[str, Any]]:
        return list(self.snapshots.values())


class ProcessPool(_SlotPool):
    """N worker processes (forkserver where the platform has it, else spawn), each fed batches
    over its own pipe; a dead one is replaced on its next use."""

    kind = "processes"

    def __init__(self, n: int, specs: Sequence[WorkerSpec]):
        super().__init__(n, specs)
        # The fork server imports once what every worker needs; each worker forks from it warm.
        self.ctx = worker_context()
        self.procs: list[_Proc] = []
        self._bid = 0
        self._fatal: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for k in range(self.n):
            self.procs.append(await asyncio.to_thread(self._spawn, k))
            self._open_slots(k)

    def _spawn(self, index: int) -> _Proc:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=_process_main, args=(child_conn, self.specs[index]),
                                   name=f"anomalyclaw-worker-{index}", daemon=True)
        try:
            process.start()
        except Exception as exc:  # noqa: BLE001
            raise WorkerStartError(f"--workers: cannot start worker process {index}: {exc}") from None
        child_conn.close()  # the parent's copy: a dead worker's pipe then reads as closed
        proc = _Proc(index, process, parent_conn)
        threading.Thread(target=self._read, args=(proc,), name=f"anomalyclaw-pool-recv-{index}", daemon=True).start()
        return proc

    def _read(self, proc: _Proc) -> None:
        """The reader thread of one worker's pipe; its messages go to the event loop."""
        assert self._loop is not None
        while True:
            try:
                msg = proc.conn.recv()
            except Exception:  # noqa: BLE001 (the worker is dead, or was killed mid-message)
                proc.process.join(timeout=5)
                self._post(self._on_dead, proc, proc.process.exitcode)
                return
            self._post(self._on_message, proc, msg)
            if msg[0] == "bye":
                return

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the run's loop has ended (the pool was closed): nothing to tell
            pass

    def _on_message(self, proc: _Proc, msg: tuple) -> None:
        kind = msg[0]
        if kind == "record":
            q = proc.batches.get(msg[1])
            if q is not None:
                q.put_nowait(("record", msg[2]))
        elif kind == "done":
            self.snapshots[(proc.index, proc.process.pid)] = msg[2]
            q = proc.batches.get(msg[1])
            if q is not None:
                q.put_nowait(("done", None))
        elif kind in ("ready", "bye"):
            self.snapshots[(proc.index, proc.process.pid)] = msg[1]
            if kind == "bye":
                proc.goodbye.set()
        elif kind == "fatal":
            self._fatal = self._fatal or msg[1]
            for q in proc.batches.values():
                q.put_nowait(("fatal", msg[1]))

    def _on_dead(self, proc: _Proc, exitcode: int | None) -> None:
        if not proc.alive:
            return
        proc.alive, proc.exitcode = False, exitcode
        proc.goodbye.set()
        if exitcode not in (0, None):
            log.warning("worker process %d (pid %s) died (exit %s); its unfinished items are judged again",
                        proc.index, proc.process.pid, exitcode)
        for q in proc.batches.values():
            q.put_nowait(("lost", exitcode))

    async def close(self, *, wait: bool = True) -> None:
        for proc in self.procs:
            if proc.alive:
                try:
                    with proc.send_lock:
                        proc.conn.send(("close",))
                except (OSError, ValueError):
                    pass
        if wait:
            pending = [p.goodbye.wait() for p in self.procs if p.alive]
            if pending:
                await asyncio.wait([asyncio.ensure_future(w) for w in pending], timeout=CLOSE_WAIT_S)
        await asyncio.to_thread(self._stop_all)

    def _stop_all(self) -> None:
        for proc in self.procs:
            proc.process.join(timeout=2)
            if proc.process.is_alive():
                proc.process.terminate()
                proc.process.join(timeout=5)
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join(timeout=5)
            try:
                proc.conn.close()
            except OSError:
                pass

    # -- work
    def _alive(self, index: int) -> bool:
        return self.procs[index].alive

    async def _replace(self, index: int) -> None:
        self.procs[index] = await asyncio.to_thread(self._spawn, index)

    def _last_exit(self, index: int) -> str:
        return f" (the last exit status {self.procs[index].exitcode})"

    async def judge(self, index: int, items: Sequence[Item]) -> AsyncIterator[Record]:
        if self._fatal:
            raise WorkerStartError(self._fatal)
        proc = self.procs[index]
        self._bid += 1
        bid = self._bid
        q: asyncio.Queue = asyncio.Queue()
        proc.batches[bid] = q
        try:
            if not proc.alive:
                raise WorkerLost(f"worker {index} exited ({proc.exitcode})")
            try:
                with proc.send_lock:
                    proc.conn.send(("batch", bid, list(items)))
            except (OSError, ValueError) as exc:
                raise WorkerLost(f"worker {index}: {exc}") from None
            while True:
                kind, value = await q.get()
                if kind == "record":
                    yield value
                elif kind == "done":
                    return
                elif kind == "fatal":
                    raise EndpointFatalError(value)
                else:
                    raise WorkerLost(f"worker process {index} (pid {proc.process.pid}) died (exit status {value})")
        finally:
            proc.batches.pop(bid, None)


# ------------------------------------------------------------------------------------- Ray

RAY_MISSING = "--ray needs Ray, which is not installed: pip install anomalyclaw[ray]"
#: How long ``ray.init`` may take (a local start is 10-20 s on a loaded 2-core machine).
RAY_INIT_TIMEOUT_S = 180.0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection (else Ray
    itself retries for minutes); ``auto`` and other forms are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    text = address if "://" in address else f"ray://{address}"
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise WorkerStartError(f"--ray {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); is the "
                               "Ray head running there? (leave the address out for a local cluster)") from None


def import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415 (an optional extra)
    except ImportError:
        raise AnomalyClawError(RAY_MISSING) from None
    return ray


class RaySession:
    """A connection to Ray for one run or benchmark: to the cluster at ``address``, else a local
    one started with ``num_cpus``; nothing is done when Ray is already initialised (the
    caller's own session is left as it is).

    ``ray.init`` runs in a daemon thread of its own, never the main thread (Ray would take over
    SIGTERM there) and one that may be abandoned (a stop during a hung connect does not wait
    for it). The thread is kept alive until :meth:`close`: with Ray 2.60, once the thread that
    called ``ray.init`` had ended, the driver's later calls spun and failed after 60 s."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 timeout_s: float = RAY_INIT_TIMEOUT_S):
        self.ray = import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.timeout_s = timeout_s
        self.started = False  # this session called ray.init (and so shuts Ray down)
        self._outcome: BaseException | None = None
        self._release = threading.Event()

    @property
    def where(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"

    def _begin(self, notify: Callable[[], None]) -> bool:
        """Start ``ray.init`` in its thread, which calls ``notify`` when it has an outcome;
        False (nothing started) when Ray is already initialised."""
        ray = self.ray
        if ray.is_initialized():
            return False
        # ERROR: Ray's start-up warnings (the SIGTERM handler it leaves to this process's own,
        # token authentication) are not the user's business.
        kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if self.address:
            kw["address"] = self.address
        else:
            # "local": a new local Ray even where `ray start` left a cluster (or a stale
            # /tmp/ray/ray_current_cluster) on this machine, which ray.init() with no address
            # would join, refusing num_cpus; `--ray auto` is the way to that cluster.
            kw.update(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1)

        def init() -> None:
            try:
                if self.address:
                    _check_reachable(self.address)
                ray.init(**kw)
                self._outcome = None
            except BaseException as exc:  # noqa: BLE001 (a wrong address, a cluster that is down)
                self._outcome = exc
            notify()
            self._release.wait()

        threading.Thread(target=init, name="anomalyclaw-ray-init", daemon=True).start()
        return True

    def _end(self, answered: bool) -> None:
        if not answered:
            self._release.set()
            raise WorkerStartError(f"--ray: {self.where} did not answer within {self.timeout_s:.0f} s")
        exc = self._outcome
        if exc is not None:
            self._release.set()
            if isinstance(exc, WorkerStartError):
                raise exc
            cause = exc  # Ray's "Failed to connect" hides why (e.g. an AuthenticationError) in its cause
            while cause.__cause__ is not None:
                cause = cause.__cause__
            why = "" if cause is exc else f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
            raise WorkerStartError(f"--ray: cannot connect to {self.where}: {type(exc).__name__}: {exc}{why}")
        self.started = True

    def start(self) -> None:
        """Connect, blocking at most ``timeout_s``; raises :class:`WorkerStartError` naming the
        cluster when it cannot."""
        done = threading.Event()
        if self._begin(done.set):
            self._end(done.wait(self.timeout_s))

    async def astart(self) -> None:
        """:meth:`start` on an event loop: a cancelled start returns at once, leaving the init
        thread behind (asyncio.run does not wait for it as it would for ``to_thread``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

        if self._begin(notify):
            try:
                await asyncio.wait_for(done, timeout=self.timeout_s)
                answered = True
            except asyncio.TimeoutError:
                answered = False
            self._end(answered)

    def close(self) -> None:
        """Shut Ray down if this session started it; release the init thread."""
        try:
            if self.started and self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            self.started = False
            self._release.set()


class RayWorker:
    """A Ray actor's class (made remote by :class:`RayPool`): one runner, batches judged on the
    actor's event loop; a batch's records come back together."""

    def __init__(self, spec: WorkerSpec):
        from anomalyclaw.config import install_secret_redaction
        from anomalyclaw.threads import raise_young_threshold, set_compute_threads

        install_secret_redaction(spec.secrets)
        set_compute_threads(1)
        self.runner = spec.build()
        self.judge_ = _BatchJudge(self.runner)
        gc.freeze()  # the actor lives for one run: what it built stays out of full collections (frozen_heap)
        raise_young_threshold()

    def pid(self) -> int:
        return os.getpid()

    async def judge(self, items: list[Item]) -> tuple[str, Any, dict[str, Any]]:
        records: list[Record] = []
        try:
            await self.judge_.judge(items, records.append)
        except EndpointFatalError as exc:
            return "fatal", redact(str(exc), self.runner.secrets), worker_snapshot(self.runner)
        return "records", records, worker_snapshot(self.runner)


class RayPool(_SlotPool):
    """N Ray actors (one CPU each) on a Ray cluster: the one at ``address``, or a local one
    started for the run (``ray.init(num_cpus=...)``) when there is none. A lost actor is
    replaced on its next use; its batch is judged again by the caller."""

    kind = "ray"
    flag = "--ray"
    dead = "Ray actors"

    def __init__(self, n: int, specs: Sequence[WorkerSpec], address: str | None = None):
        self.ray = import_ray()
        super().__init__(n, specs)
        self.address = address
        self.session = RaySession(address, num_cpus=max(n, os.cpu_count() or 1))
        self.actors: list[Any] = []
        self.alive: list[bool] = []
        self._generation = [0] * n

    async def start(self) -> None:
        await self.session.astart()
        ray = self.ray
        self._remote = ray.remote(num_cpus=1, max_restarts=0)(RayWorker)
        for k in range(self.n):
            self.actors.append(self._remote.remote(self.specs[k]))
            self.alive.append(True)
            self._open_slots(k)

    async def close(self, *, wait: bool = True) -> None:
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        await asyncio.to_thread(self.session.close)

    def _alive(self, index: int) -> bool:
        return self.alive[index]

    async def _replace(self, index: int) -> None:
        self.actors[index] = self._remote.remote(self.specs[index])
        self.alive[index] = True
        self._generation[index] += 1

    async def judge(self, index: int, items: Sequence[Item]) -> AsyncIterator[Record]:
        ray = self.ray
        actor, generation = self.actors[index], self._generation[index]
        try:
            kind, value, snapshot = await actor.judge.remote(list(items))
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as exc:
            if self._generation[index] == generation:
                self.alive[index] = False
            raise WorkerLost(f"Ray actor {index} was lost: {type(exc).__name__}") from None
        self.snapshots[(index, snapshot["pid"])] = snapshot
        if kind == "fatal":
            raise EndpointFatalError(value)
        for record in value:
            yield record


# --------------------------------------------------------------------------- the runner

def merge_caches(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cache counters of several workers added up (numbers summed, by cache name)."""
    out: dict[str, Any] = {}
    for group in groups:
        for name, stats in (group or {}).items():
            into = out.setdefault(name, {})
            for key, value in (stats or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                        not key.startswith("max_"):
                    into[key] = into.get(key, 0) + value
                else:
                    into.setdefault(key, value)
    return dict(sorted(out.items()))


def grouped(items: Sequence[Item]) -> list[Item]:
    """``items`` with each (domain, category) together, the groups in the order they first
    appear and the items of a group in theirs: a category's items share reference images, so
    a shard of contiguous items needs few of them."""
    first: dict[tuple[str, str | None], int] = {}
    for it in items:
        first.setdefault((it.domain, it.category), len(first))
    return sorted(items, key=lambda it: first[(it.domain, it.category)])


class Shards:
    """A run's batches in ``n`` contiguous shards, one per worker: worker ``k`` takes shard ``k``
    front to back, and a worker whose shard is done takes from the back of the fullest other
    one (work stealing, so nobody idles while batches wait), where its owner would arrive last.
    Each worker thus warms the caches (decoded references, their features, the experts' fits)
    of the reference sets of about its own share of the run, not of all of them, as when every
    batch went to whichever worker was free.

    Every batch has ``size`` items but the last (``rest``); :meth:`take` is asked for a batch of
    a given length so that the driver's count of what each job owes is exact."""

    def __init__(self, batches: Sequence[list[Item]], n: int):
        self.size = len(batches[0]) if batches else 0
        full = [b for b in batches if len(b) == self.size]
        self.rest = [b for b in batches if len(b) != self.size]
        n = max(1, min(n, len(full))) if full else 1
        bounds = [round(k * len(full) / n) for k in range(n + 1)]
        self.shards = [collections.deque(full[bounds[k]:bounds[k + 1]]) for k in range(n)]
        self.steals = 0

    def take(self, worker: int, length: int) -> list[Item]:
        """The next batch of ``length`` items for ``worker``."""
        if length != self.size:
            return self.rest.pop()
        own = self.shards[worker % len(self.shards)]
        if own:
            return own.popleft()
        self.steals += 1
        return max(self.shards, key=len).pop()


class ShardedRunner(Runner):
    """A :class:`Runner` whose items are judged by ``workers`` worker processes, or by Ray
    actors when ``ray`` is set (``""`` or None for a local cluster, else the cluster's
    address); this process is the one writer of the records. The VLM given is the parent's
    (checked by the caller, used for the fingerprint); each worker builds its own."""

    def __init__(self, vlm: Any, *, workers: int = 2, ray: str | None | bool = False, batch_size: int | None = None,
                 **kwargs: Any):
        super().__init__(vlm, **kwargs)
        if workers < 1:
            raise ValueError(f"--workers {workers}: need at least 1")
        self.workers = workers
        self.ray = ray
        self.batch_size = batch_size
        self.pool: ProcessPool | RayPool | None = None
        self._starting: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self.worker_cpu_s = 0.0
        """CPU seconds the workers spent in this run (what their last reports say)."""
        self.shards: Shards | None = None
        backend = getattr(vlm, "backend", None)
        if backend not in ("offline", "openai"):
            raise AnomalyClawError(f"--workers/--ray need the offline or openai backend (workers build their own "
                                   f"client); this VLM's backend is {backend!r}")
        self.shares = split_concurrency(int(getattr(vlm, "max_concurrency", 0) or 0) or 2 * workers, workers)
        custom = self.registry.custom_names()
        if custom:  # a worker builds its tools from their names: these it could not
            raise AnomalyClawError(
                f"--workers/--ray: each worker builds its tools again from the 13-tool catalog by name, and "
                f"{', '.join(custom)} {'is' if len(custom) == 1 else 'are'} not from it (added with "
                "ToolRegistry.add); run this registry in one process (no --workers/--ray)")

    def request_stop(self, reason: str = "stop requested") -> None:
        super().request_stop(reason)
        starting = self._starting
        if starting is not None:  # still starting the workers (a Ray cluster connecting): stop that
            loop, task = starting
            loop.call_soon_threadsafe(task.cancel)

    def _compute_threads(self) -> ContextManager[None]:
        """As the libraries have them: this process computes nothing (its workers set their own),
        and setting torch's would import it here (1.6 s of CPU while the fork server imports)."""
        return contextlib.nullcontext()

    def specs(self) -> list[WorkerSpec]:
        endpoint = getattr(self.vlm, "endpoint", None) if self.vlm.backend == "openai" else None
        # Worker processes share this machine's cores; a Ray actor holds the one CPU it reserves.
        slots = default_compute_slots(1 if self.uses_ray else (os.cpu_count() or 1) // self.workers)
        return [WorkerSpec(backend=self.vlm.backend, endpoint=endpoint, concurrency=share, config=self.config,
                           tools=self.registry.names(), prompts=self.prompts, out_dir=str(self.out_dir),
                           run_id=self.run_id, save_images=self.save_images, save_maps=self.save_maps,
                           threshold=self.threshold, item_timeout_s=self.item_timeout_s, secrets=self.secrets,
                           compute_slots=slots, event_loop=running_loop_kind())
                for share in self.shares]

    @property
    def uses_ray(self) -> bool:
        """Ray actors (``ray`` an address, or ``""`` for a local Ray), not worker processes."""
        return self.ray is not False and self.ray is not None

    def make_pool(self) -> ProcessPool | RayPool:
        if self.uses_ray:
            return RayPool(self.workers, self.specs(), address=self.ray or None)
        return ProcessPool(self.workers, self.specs())

    def _batch_size(self, n_items: int) -> int:
        if self.batch_size:
            return self.batch_size
        per_worker = default_item_concurrency(max(self.shares))  # a worker runner's item_concurrency
        # Small enough that every worker gets several batches (a dead worker costs little), big
        # enough that SLOTS_PER_WORKER batches keep its items in flight.
        return max(1, min(math.ceil(per_worker / 2), math.ceil(n_items / (4 * self.workers))))

    async def _run_queue(self, todo: list[Item], writer: RecordWriter, summary: RunSummary) -> None:
        if not todo:
            return
        size = self._batch_size(len(todo))
        todo = grouped(todo)
        batches = [todo[k:k + size] for k in range(0, len(todo), size)]
        shards = self.shards = Shards(batches, self.workers)
        pool = self.pool = self.make_pool()
        clean = False
        try:
            start = asyncio.ensure_future(pool.start())
            self._starting = (asyncio.get_running_loop(), start)
            if self._stop_reason is not None:
                start.cancel()
            try:
                await start
            except asyncio.CancelledError:
                if self._stop_reason is None:
                    raise
                summary.interrupted, self._stop_reason = self._stop_reason, None
                summary.n_abandoned = 0
                return
            finally:
                self._starting = None

            async def handle(job: list[Item], emit: Callable[[Record], Awaitable[None]]) -> None:
                # The driver's job is a batch of the right length; which batch is the worker's.
                index = await pool.acquire()
                try:
                    batch = shards.take(index, len(job))
                except BaseException:
                    pool.release(index)
                    raise
                await self._judge_on_pool(pool, batch, emit, singles=False, index=index)

            await self._drive(batches, handle, writer, summary, size=len, unit="item",
                              concurrency=self.workers * SLOTS_PER_WORKER)
            clean = summary.interrupted is None and summary.fatal is None
        except WorkerStartError as exc:
            summary.fatal = redact(str(exc), self.secrets)
        finally:
            await pool.close(wait=clean)
            self.worker_cpu_s = sum(s.get("cpu_s", 0.0) for s in pool.worker_snapshots())

    async def _judge_on_pool(self, pool: Any, items: list[Item], emit: Callable[[Record], Awaitable[None]], *,
                             singles: bool, tries: int = 1, index: int | None = None) -> None:
        """Judge ``items`` on one worker. If it dies, the items it did not finish are judged
        again one per batch (so one item that kills its worker cannot take others with it); one
        whose worker died twice judging it alone gets an error record. ``index``: the worker's
        slot when the caller has acquired it already (released here all the same)."""
        pending = {it.item_id: it for it in items}
        if index is None:
            index = await pool.acquire()
        try:
            async for record in pool.judge(index, list(pending.values())):
                if pending.pop(record.item_id, None) is not None:
                    await emit(record)
            return
        except WorkerLost as exc:
            lost, reason = list(pending.values()), str(exc)
        finally:
            pool.release(index)
        if singles and tries >= 2:
            for item in lost:
                await emit(error_record(item, f"internal: {reason} while judging this item alone, {tries} times; "
                                              "--resume --retry-errors judges it again", run_id=self.run_id,
                                        backend=self.vlm.backend, model=self.vlm.model))
            return
        await asyncio.gather(*(self._judge_on_pool(pool, [it], emit, singles=True, tries=tries + 1 if singles else 1)
                               for it in lost))

    def _collect_stats(self, summary: RunSummary) -> None:
        from anomalyclaw.graph.vlm.replicas import merge_stats, without_latencies

        snaps = self.pool.worker_snapshots() if self.pool is not None else []
        summary.cache = merge_caches([s.get("cache") or {} for s in snaps])
        rows = merge_stats(s.get("replicas") or [] for s in snaps)
        summary.replicas = without_latencies(rows)
        # The workers' conversations are where an ``auto`` run falls back; the parent's own
        # ToolCalling never sees a request.
        fallback = next((s["tool_calling_fallback"] for s in snaps if s.get("tool_calling_fallback")), None)
        if fallback is not None and self.tool_calling.mode == "auto" and self.tool_calling.fallback is None:
            self.tool_calling.fallback = fallback
        summary.tool_calling = self.tool_calling.describe()
        summary.workers = {"kind": self.pool.kind if self.pool is not None else None, "n": self.workers,
                           "concurrency": self.shares, "respawns": getattr(self.pool, "respawns", 0),
                           "steals": self.shards.steals if self.shards is not None else 0,
                           "cpu_s": round(self.worker_cpu_s, 3),
                           "event_loops": sorted({s["event_loop"] for s in snaps if s.get("event_loop")})}
