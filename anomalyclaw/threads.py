"""How many threads compute at once while items run in parallel.

Two knobs. Intra-operation threads (BLAS, OpenMP, torch, OpenCV): the runner parallelises
across items, and letting every small matrix product also fan out over all cores oversubscribes
the machine (under load a small PCA fit becomes several times slower with the default BLAS
threads than with one). OpenCV's own pool is worse than idle when items already fill the cores:
its workers wait for the next call by spinning on ``sched_yield``, which ``perf`` showed taking
5% of a run's CPU samples on two cores (its thread alone), for no speed-up. Compute slots: the CPU work of items (tools, experts, maps, image decoding and
encoding) runs in worker threads, and the event loop's default pool has ``cpu_count + 4`` of
them; more threads computing at once than there are cores only contend for the GIL and the
caches. :func:`compute_slot` lets at most :func:`compute_slots` threads in, by default one per
core. Each thread beyond that adds GIL convoys: a thread that drops the GIL around an OpenCV,
NumPy or torch call sleeps on the GIL's condition variable to get it back whenever another
thread took it meanwhile (``perf record -e sched:sched_switch`` of a run: most of its context
switches are in ``take_gil``). ``anomalyclaw bench slots`` measures the settings side by side.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")


def _torch():
    """torch, imported if it is installed (experts use it: set its threads before they do)."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            return None
    return torch


def _cv2():
    """OpenCV, imported if it is installed."""
    try:
        import cv2  # noqa: PLC0415
    except ImportError:
        return None
    return cv2


def set_compute_threads(n: int) -> None:
    """For the rest of the process (a worker's lifetime): BLAS/OpenMP pools, torch and OpenCV use
    at most ``n`` threads."""
    threadpool_limits(limits=n)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(n)
    cv2 = _cv2()
    if cv2 is not None:
        cv2.setNumThreads(n)


@contextlib.contextmanager
def limit_compute_threads(n: int | None = 1) -> Iterator[None]:
    """Within the block, BLAS/OpenMP pools, torch and OpenCV use at most ``n`` threads (None: as
    is); then as before."""
    if n is None:
        yield
        return
    torch, cv2 = _torch(), _cv2()
    before = torch.get_num_threads() if torch is not None else None
    cv2_before = cv2.getNumThreads() if cv2 is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        if cv2 is not None:
            cv2.setNumThreads(n)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
            if cv2 is not None and cv2_before is not None:
                cv2.setNumThreads(cv2_before)


#: Intra-op threads of the libraries while a run judges items (None: as the libraries set them).
_intra_op: int | None = 1


def intra_op_threads() -> int | None:
    """The intra-op threads a run in this process gives BLAS, torch and OpenCV (None: theirs)."""
    return _intra_op


@contextlib.contextmanager
def limit_intra_op_threads(n: int | None) -> Iterator[None]:
    """Within the block, runs give the libraries ``n`` intra-op threads (None: their own
    defaults; ``anomalyclaw bench profile --intra-op-threads`` compares); then as before."""
    global _intra_op
    if n is not None and int(n) < 1:
        raise ValueError(f"intra-op threads must be >= 1 or None, got {n}")
    before, _intra_op = _intra_op, None if n is None else int(n)
    try:
        yield
    finally:
        _intra_op = before


def default_compute_slots(cores: int | None = None) -> int:
    """The cores a process may use (default: the machine's), at least one."""
    return max(1, int(cores if cores is not None else os.cpu_count() or 1))


_slots = default_compute_slots()
_gate = threading.BoundedSemaphore(_slots)
_inside = threading.local()


def compute_slots() -> int:
    """How many threads may compute at once in this process."""
    return _slots


def set_compute_slots(n: int) -> None:
    """For the rest of the process (a worker's lifetime), at most ``n`` threads compute at once
    (threads inside a slot already keep theirs)."""
    global _slots, _gate
    if int(n) < 1:
        raise ValueError(f"compute slots must be >= 1, got {n}")
    _slots, _gate = int(n), threading.BoundedSemaphore(int(n))


@contextlib.contextmanager
def limit_compute_slots(n: int | None) -> Iterator[None]:
    """Within the block, at most ``n`` threads compute at once (None: as is); then as before."""
    before = _slots
    if n is not None:
        set_compute_slots(n)
    try:
        yield
    finally:
        set_compute_slots(before)


class StageClock:
    """CPU seconds of each stage of a run's compute-thread work: while one is installed
    (:func:`clock_stages`), every outermost :func:`compute_slot` charges its thread's own CPU
    clock, from entering the slot to leaving it, to the slot's label (the tool's name, the
    function sent to a worker thread). Exact, unlike a sampler: what a C call did with the GIL
    held is counted where it ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, label: str, seconds: float) -> None:
        with self._lock:
            self.seconds[label] = self.seconds.get(label, 0.0) + seconds
            self.calls[label] = self.calls.get(label, 0) + 1


_stage_clock: StageClock | None = None


@contextlib.contextmanager
def clock_stages() -> Iterator[StageClock]:
    """Within the block, compute slots report their CPU to the clock it yields."""
    global _stage_clock
    before, _stage_clock = _stage_clock, StageClock()
    try:
        yield _stage_clock
    finally:
        _stage_clock = before


@contextlib.contextmanager
def compute_slot(label: str = "other") -> Iterator[None]:
    """Within the block this thread holds one of the process's compute slots, waiting (without
    spinning) for one to be free. Re-entrant: a tool that asks an expert holds one slot.
    ``label``: the stage a :class:`StageClock` charges the block's CPU to."""
    if getattr(_inside, "depth", 0):
        _inside.depth += 1
        try:
            yield
        finally:
            _inside.depth -= 1
        return
    gate = _gate
    gate.acquire()
    _inside.depth = 1
    clock = _stage_clock
    started = time.thread_time() if clock is not None else 0.0
    try:
        yield
    finally:
        if clock is not None:
            clock.add(label, time.thread_time() - started)
        _inside.depth = 0
        gate.release()


def _in_slot(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with compute_slot((getattr(fn, "__qualname__", None) or type(fn).__name__).replace("<locals>.", "")):
        return fn(*args, **kwargs)


async def to_compute_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread`` for CPU work: ``fn`` runs in a worker thread inside a compute slot."""
    return await asyncio.to_thread(functools.partial(_in_slot, fn), *args, **kwargs)


_frozen_lock = threading.Lock()
_frozen_depth = 0
_threshold_before: tuple[int, ...] | None = None
#: The cyclic collector's young-generation threshold inside a run (:func:`frozen_heap`).
RUN_YOUNG_THRESHOLD = 10_000


def raise_young_threshold() -> tuple[int, ...]:
    """Raise the collector's young-generation threshold to at least :data:`RUN_YOUNG_THRESHOLD`
    (see :func:`frozen_heap`); returns the thresholds before, for ``gc.set_threshold``."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], RUN_YOUNG_THRESHOLD), *before[1:])
    return before


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, the objects alive when it starts (modules, models, caches: ~400k of
    them once LangChain and torch are imported) are left out of the cyclic collector's full
    passes (``gc.freeze``), and put back after (``gc.unfreeze``); nested or concurrent blocks
    freeze once. A full pass over them costs ~0.3 s of CPU with the GIL held, every ~100 items
    of a run; frozen, it costs what the run's own new objects do. ``anomalyclaw bench profile``
    reports the collector's CPU per item.

    The young generation's threshold is raised to at least :data:`RUN_YOUNG_THRESHOLD` as well
    (restored after): at CPython's 700 a run collects its young objects more than once per item
    (LangGraph, LangChain and the SDK allocate thousands), and nearly all of them die young
    anyway; what an item leaves in cycles is ~130 small objects and no image (measured with
    ``gc.DEBUG_SAVEALL`` over 96 items), so waiting longer holds back little memory."""
    global _frozen_depth, _threshold_before
    with _frozen_lock:
        if _frozen_depth == 0:
            gc.freeze()
            _threshold_before = raise_young_threshold()
        _frozen_depth += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()
                if _threshold_before is not None:
                    gc.set_threshold(*_threshold_before)
                    _threshold_before = None
