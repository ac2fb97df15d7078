"""Where a run's CPU goes, per item: ``anomalyclaw bench profile``.

The runner (``openai`` backend, default :class:`~anomalyclaw.config.AgentConfig`) judges copies
of synthetic items against the fake endpoint (its own process, so its CPU is not counted), with
the progress bar a command-line run draws (its output discarded). A
warm-up pass first calibrates the reference sets, as in a long run; with ``new_sets`` the
measured items instead bring reference sets never seen before (the real-data case: 61% of
CrossDomainVAD-12's test items do).

The profiler is a CPU-time-weighted stack sampler in this process (:class:`CPUSampler`): every
few milliseconds it reads each thread's own CPU clock and its Python stack, and spreads each
thread's CPU over the categories of the stacks it was found running in (the innermost frame that
belongs to a category; NumPy, OpenCV, pydantic and other generic libraries decide nothing, so
their time goes to the code that called them). So the table's milliseconds are CPU time, they add
up to the process's CPU per item, and what no thread's clock accounts for (threads that ended
between two samples) is shown as such.

How the CPU is spread: each sample charges the CPU a thread's clock moved since the previous
sample (not the sample itself: a thread found in the same place while its clock stands still,
such as the records' writer in ``fsync``, spent nothing there). A thread found waiting (its
innermost frame is a known wait: the event loop's ``select``, a condition, lock or queue wait, an
idle executor worker, a compute slot's gate) spent that CPU before it blocked, so it goes to
where the thread last ran. One found with its clock next to still (blocked in a system call,
a sleep, a wait for the GIL) keeps the little it spent where it is found, and if the next sample
finds it there again with CPU spent, that CPU goes to where it last ran (it ran there and came
back to block). A thread found somewhere else than the last sample found it running moved in
between, so that CPU is split between the two places, or goes all to the first if the thread
turns out to have gone to the second to block. The first version charged each sample's CPU to the frame it was
found in, which put most of the event-loop thread's CPU into ``select`` (12 of its 20 ms/item)
and LangGraph at 0.3 ms/item; the second spread each thread's CPU in proportion to how often it
was found running somewhere, which charged the compute threads' CPU to the records' ``fsync``
they also sit in (records read 27-39 ms/item; now 1.1, and the compute categories agree with the
exact compute-stage clocks: tools 20.2 against ``side_by_side_compare``'s 17.5, experts 14.4
against 14.2). While sampling, a thread that wants the GIL asks its holder for it after a tenth
of the sampling interval instead of CPython's 5 ms, so the sampler also finds pure Python that
runs for a few milliseconds between two releases of the GIL (at 5 ms it got the GIL only where a
thread gave it up). What it cannot know is where a thread that moved between two samples spent
that interval's CPU (it splits it), so the finest split is a guide. The total and the
event-loop thread's CPU are exact; an A/B of the process's CPU (two runs, one change) is the way
to price one function. A sampling profiler
from outside (py-spy) was tried first: on this 2-core machine its "active thread" heuristic
charged several times the process's CPU time (threads waiting on a queue or the GIL counted as
running), so its shares could not be read as CPU.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

from anomalyclaw.config import AgentConfig

#: Categories in table order (``other``: frames of none of them).
CATEGORY_ORDER = ("tools", "experts", "image decode/resize", "image encode + base64", "request building", "HTTP",
                  "LangGraph", "LangChain runtime", "agent logic", "runner", "records", "progress",
                  "event loop", "other")


def _package_dir(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is None:
        __import__(module)
        mod = sys.modules[module]
    where = mod.__file__ if getattr(mod, "__file__", None) else os.path.join(list(mod.__path__)[0], "_")
    return str(Path(where).resolve().parent) + os.sep


#: The HTTP stacks under the endpoint clients (both transports), whose frames are "HTTP".
_HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio", "sniffio", "aiohttp", "yarl",
                   "multidict", "aiohappyeyeballs")


def _site_dirs() -> dict[str, str]:
    """Top-level library name -> its folder, for the libraries the rules name."""
    out = {}
    for name in ("tqdm", "langgraph", "langchain_core", "langchain_openai", "openai", *_HTTP_LIBRARIES, "asyncio",
                 "PIL", "tenacity", "langsmith"):
        try:
            out[name] = _package_dir(name)
        except ImportError:
            continue
    return out


class _Rules:
    """``(filename, function) -> category or None`` (None: the frame decides nothing)."""

    def __init__(self) -> None:
        root = _package_dir("anomalyclaw")
        self.anomalyclaw = root
        self.dirs = {"experts": _package_dir("anomalyclaw.experts"), "tools": _package_dir("anomalyclaw.tools"),
                     "graph": _package_dir("anomalyclaw.graph"), "vlm": _package_dir("anomalyclaw.graph.vlm"),
                     "running": _package_dir("anomalyclaw.eval.running"), "prompts": _package_dir("anomalyclaw.prompts")}
        self.site = _site_dirs()
        self.stdlib = str(Path(os.__file__).resolve().parent) + os.sep
        self._memo: dict[tuple[str, str], str | None] = {}

    def __call__(self, filename: str, function: str) -> str | None:
        key = (filename, function)
        if key not in self._memo:
            self._memo[key] = self._decide(filename, function)
        return self._memo[key]

    def _lib(self, filename: str, *names: str) -> bool:
        return any(filename.startswith(self.site[n]) for n in names if n in self.site)

    def _decide(self, filename: str, function: str) -> str | None:
        d = self.dirs
        filename = os.path.realpath(filename)
        if self._lib(filename, "tqdm"):
            return "progress"
        if filename.startswith(d["running"]):
            return "records" if filename.endswith("records.py") else "runner"
        if filename == self.anomalyclaw + "imaging.py":
            return "image encode + base64" if function in ("encode_image", "to_data_url") else "image decode/resize"
        if filename == self.anomalyclaw + "cache.py":
            return None  # the LRU's own work belongs to what it caches
        if filename.startswith(d["experts"]):
            return "experts"
        if filename.startswith(d["tools"]):
            return "tools"
        if filename.startswith(d["vlm"]):
            return "request building" if filename.endswith(("endpoint.py", "seam.py")) else "agent logic"
        if filename == d["graph"] + "images.py":
            return "image encode + base64"
        if filename.startswith(d["graph"]) or filename.startswith(d["prompts"]):
            return "agent logic"
        if self._lib(filename, "openai") and "/_vendor/httpx_aiohttp/" in filename:
            return "HTTP"  # the SDK's bridge from httpx requests to aiohttp (the aiohttp transport)
        if self._lib(filename, "langchain_openai", "openai"):
            return "request building"
        if self._lib(filename, "langchain_core"):
            rest = filename[len(self.site["langchain_core"]):]
            if rest.startswith("tools"):
                return "tools"
            if rest.startswith(("messages", "language_models", "utils/function_calling")):
                return "request building"
            return "LangChain runtime"
        if self._lib(filename, "langsmith"):
            return "LangChain runtime"
        if self._lib(filename, *_HTTP_LIBRARIES):
            return "HTTP"
        if self._lib(filename, "langgraph"):
            return "LangGraph"
        if filename.startswith(self.stdlib):
            rest = filename[len(self.stdlib):]
            if rest.startswith(("ssl.py", "socket.py", "selectors.py", "asyncio/selector_events.py",
                                "asyncio/streams.py", "asyncio/sslproto.py")):
                return "HTTP"
            if rest.startswith("base64.py"):
                return "image encode + base64"
            if rest.startswith("asyncio/"):
                return "event loop"
        if filename.startswith(self.anomalyclaw):
            return "agent logic"
        return None


def _current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the garbage collector held off: in CPython 3.11 a
    collection triggered inside it (it allocates while holding the thread-list lock) can run a
    finaliser that waits for that lock, and the process hangs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        if enabled:
            gc.enable()


def _wait_frames() -> frozenset[tuple[str, str]]:
    """(filename, function) of the innermost frames of a thread blocked in a wait: the selector's
    ``select``, ``threading``'s waits, ``queue.Queue.get``, an idle ``concurrent.futures``
    worker (blocked in its work queue's C ``get``) and :func:`~anomalyclaw.threads.compute_slot`
    (waiting at the gate)."""
    import concurrent.futures.thread
    import queue
    import selectors

    from anomalyclaw import threads

    def where(fn: Any) -> tuple[str, str]:
        fn = getattr(fn, "__wrapped__", fn)
        return fn.__code__.co_filename, fn.__code__.co_name

    selects = {where(cls.select) for cls in vars(selectors).values()
               if isinstance(cls, type) and issubclass(cls, selectors.BaseSelector) and "select" in vars(cls)}
    return frozenset(selects | {where(threading.Condition.wait), where(threading.Event.wait),
                                where(threading.Semaphore.acquire), where(threading.Thread._wait_for_tstate_lock),
                                where(queue.Queue.get), where(concurrent.futures.thread._worker),
                                where(threads.compute_slot)})


#: A thread whose clock moved less than this fraction of the time between two samples was
#: blocked (in a system call such as ``fsync``, a sleep, a wait for the GIL) wherever it is found.
IDLE_FRACTION = 0.1


class _ThreadTally:
    """One thread's CPU: ``cpu`` in all, ``running`` charged to the places it ran, ``waited``
    found at waits before it was ever found running. ``last``: where it last ran; ``before``:
    how the previous sample found it (``"wait"``, ``"idle"`` or ``"busy"``, and where);
    ``pending``: the CPU of an interval in which it moved from one place to another, until the
    next sample says whether it went there to block."""

    __slots__ = ("cpu", "running", "waited", "last", "before", "pending")

    def __init__(self) -> None:
        self.cpu = 0.0
        self.running: Counter = Counter()
        self.waited: Counter = Counter()
        self.last: tuple[str, str] | None = None
        self.before: tuple[str, tuple[str, str] | None] = ("wait", None)
        self.pending: tuple[tuple[str, str], tuple[str, str], float] | None = None

    def charge(self, key: tuple[str, str], spent: float, how: str) -> None:
        """The CPU ``spent`` since the previous sample, which finds the thread at ``key``:
        ``how`` is ``"wait"`` (a known wait), ``"idle"`` (its clock next to still: blocked in a
        system call such as ``fsync``, a sleep or a wait for the GIL) or ``"busy"``."""
        self.cpu += spent
        if self.pending is not None:
            came_from, went_to, moved = self.pending
            self.pending = None
            if how == "idle" and key == went_to:  # it went there to block: it ran where it came from
                self.running[came_from] += moved
                self.last = came_from
            else:
                self.running[came_from] += moved / 2
                self.running[went_to] += moved / 2
        was, where = self.before
        self.before = (how, key)
        if how == "wait":  # spent before it blocked: where it last ran
            (self.running if self.last is not None else self.waited)[self.last or key] += spent
        elif how == "idle":
            self.running[key] += spent
        elif was == "idle" and where == key and self.last not in (None, key):
            # Blocked here at the last sample and here again: it ran where it last ran, in between.
            self.running[self.last] += spent
        elif was == "wait" or self.last in (None, key) or was == "idle":
            self.running[key] += spent
            self.last = key
        else:
            self.pending = (self.last, key, spent)
            self.last = key

    def settle(self) -> None:
        """The last sample's move, if any, half to each side."""
        if self.pending is not None:
            came_from, went_to, moved = self.pending
            self.running[came_from] += moved / 2
            self.running[went_to] += moved / 2
            self.pending = None


class CPUSampler:
    """Charges each thread's CPU time to its stack's category, sampling every ``interval_s``.

    Use as a context manager around the code to profile; :attr:`seconds` holds CPU seconds by
    category, :attr:`own_seconds` the sampler's own CPU.
    """

    def __init__(self, interval_s: float = 0.005, rules: Callable[[str, str], str | None] | None = None):
        self.interval_s = interval_s
        self.rules = rules or _Rules()
        self.seconds: Counter = Counter()
        #: CPU seconds by (category, the function that decided it).
        self.functions: Counter = Counter()
        self.samples = 0
        self.own_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="anomalyclaw-cpu-sampler", daemon=True)
        self._last: dict[int, float] = {}
        self._threads: dict[int, _ThreadTally] = {}
        self._waits = _wait_frames()

    def category(self, frame: FrameType | None) -> tuple[str, str]:
        """The category of the stack ending in ``frame`` (innermost first), and the function
        that decided it (``file:function``)."""
        innermost = frame
        while frame is not None:
            code = frame.f_code
            found = self.rules(code.co_filename, code.co_name)
            if found is not None:
                return found, f"{Path(code.co_filename).name}:{code.co_name}"
            frame = frame.f_back
        code = innermost.f_code if innermost is not None else None
        return "other", f"{Path(code.co_filename).name}:{code.co_name}" if code else "?"

    def _clock(self, ident: int) -> float | None:
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, ValueError, OverflowError):  # the thread ended meanwhile
            return None

    def waiting(self, frame: FrameType | None) -> bool:
        """Whether a thread whose innermost frame is ``frame`` is blocked in a known wait."""
        if frame is None:
            return True
        code = frame.f_code
        return (code.co_filename, code.co_name) in self._waits

    def _loop(self) -> None:
        me = threading.get_ident()
        for ident in list(_current_frames()):
            value = self._clock(ident)
            if value is not None:
                self._last[ident] = value
        at = time.monotonic()
        while not self._stop.wait(self.interval_s):
            before, at = at, time.monotonic()
            frames = _current_frames()
            self.samples += 1
            for ident, frame in frames.items():
                if ident == me:
                    continue
                now = self._clock(ident)
                if now is None:
                    continue
                spent = now - self._last.get(ident, now)
                self._last[ident] = now
                thread = self._threads.setdefault(ident, _ThreadTally())
                spent = max(spent, 0.0)
                how = ("wait" if self.waiting(frame) else
                       "idle" if spent < IDLE_FRACTION * (at - before) else "busy")
                thread.charge(self.category(frame), spent, how)
            del frames
        self.own_seconds = time.thread_time()
        self._charge()

    def _charge(self) -> None:
        """Each thread's CPU where it ran (see the module docstring); what it spent before it was
        first found running goes with the rest of its CPU."""
        for thread in self._threads.values():
            thread.settle()
            found = sum(thread.running.values())
            if found > 0:
                scale = thread.cpu / found
                shares = {key: seconds * scale for key, seconds in thread.running.items()}
            else:
                shares = dict(thread.waited)
            for (name, where), seconds in shares.items():
                self.seconds[name] += seconds
                self.functions[(name, where)] += seconds

    def __enter__(self) -> "CPUSampler":
        # A thread that wants the GIL waits a switch interval (5 ms) before it asks the holder to
        # drop it: with that, the sampler would get the GIL only where a thread releases it (a
        # wait, a C call) and never see pure Python that runs for less. Asking after a tenth of
        # its interval, it samples where the CPU goes (the run's threads switch sooner too; the
        # README gives the totals of profiled runs before and after this, alternating).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, self.interval_s / 10))
        self._started_cpu = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch_interval)
        self.process_seconds = time.process_time() - self._started_cpu
        """The process's CPU time over the sampled window (what the categories add up to)."""


class GCClock:
    """The cyclic garbage collector's CPU while the block runs (``gc.callbacks``: the collecting
    thread's clock from each pass's start to its stop), by generation; the collector runs
    inside whatever code allocated, so this time is also in the categories above."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.passes = [0, 0, 0]
        self._started = threading.local()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started.at = time.thread_time()
        elif getattr(self._started, "at", None) is not None:
            generation = int(info["generation"])
            self.seconds[generation] += time.thread_time() - self._started.at
            self.passes[generation] += 1
            self._started.at = None

    def __enter__(self) -> "GCClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)


def profile_run(*, n_items: int = 96, concurrency: int = 32, latency_s: float = 0.05, client: str = "langchain",
                transport: str = "aiohttp", image_size: int = 512, n_test_per_domain: int = 4, new_sets: bool = False,
                interval_s: float = 0.005, work_dir: str | os.PathLike | None = None,
                config: AgentConfig | None = None, top_functions: int = 25,
                compute_slots: int | None = None, intra_op_threads: int | None = 1) -> dict[str, Any]:
    """Profile one runner pass; returns ``{"cpu_ms_per_item", "by_category": {name: ms per
    item}, ...}`` (see the module docstring). ``compute_slots``: threads that may compute at
    once during the run (:func:`~anomalyclaw.threads.set_compute_slots`; None: the default).
    ``intra_op_threads``: the BLAS, torch and OpenCV threads inside the run (a run's default,
    1; None: as the libraries set them)."""
    from anomalyclaw import threads
    from anomalyclaw.eval.bench.reference_sets import new_set_items
    from anomalyclaw.eval.bench.throughput import _run, _vlm, copies, fake_endpoint_process
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.experts.pool import ExpertPool

    config = config or AgentConfig()
    with (threads.limit_compute_slots(compute_slots), threads.limit_intra_op_threads(intra_op_threads),
          tempfile.TemporaryDirectory(prefix="anomalyclaw-profile-") as tmp):
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        manifest = generate_benchmark(work / "synth", seed=0, n_test_per_domain=n_test_per_domain, n_calibration=0,
                                      n_dev=0, size=image_size)
        items = load_manifest(manifest, split="test")
        pool = ExpertPool("classic")
        with fake_endpoint_process(latency_s) as url:
            _run(items[:2], _vlm(url, 2, client, transport), work / "imports", config, ExpertPool("classic"))  # imports
            if new_sets:
                measured = new_set_items(work / "new_sets", n_items, size=image_size)
            else:
                _run(items, _vlm(url, 8, client, transport), work / "warmup", config, pool)  # every set calibrated once
                measured = copies(items, n_items)
            sampler, collector = CPUSampler(interval_s), GCClock()
            # With the progress bar, as `anomalyclaw run` draws it; what it draws is discarded.
            with sampler, collector, threads.clock_stages() as stages, contextlib.redirect_stderr(io.StringIO()):
                row = _run(measured, _vlm(url, concurrency, client, transport), work / "measured", config, pool,
                           progress=True)
    summary = row.pop("summary")
    done = max(1, row["items"])
    cpu_ms = round(1000 * sampler.process_seconds / done, 1)  # the sampled window: the pass, start to end
    by = {name: round(1000 * sampler.seconds[name] / done, 1) for name in CATEGORY_ORDER if sampler.seconds[name]}
    own = round(1000 * sampler.own_seconds / done, 1)
    by["unattributed"] = round(cpu_ms - sum(by.values()) - own, 1)
    top = [{"category": name, "function": where, "ms_per_item": round(1000 * sec / done, 2)}
           for (name, where), sec in sampler.functions.most_common(top_functions)]
    return {"client": client, "transport": transport, "items": row["items"], "errors": row["errors"],
            "concurrency": concurrency, "latency_s": latency_s, "image_size": image_size, "new_sets": new_sets,
            "compute_slots": compute_slots or threads.compute_slots(), "intra_op_threads": intra_op_threads,
            "cpu_ms_per_item": cpu_ms,
            "profiler_ms_per_item": own,
            "gc_ms_per_item": [round(1000 * sec / done, 2) for sec in collector.seconds], "gc_passes": collector.passes,
            "stages": {label: {"ms_per_item": round(1000 * sec / done, 2), "calls_per_item": round(stages.calls[label] / done, 2)}
                       for label, sec in sorted(stages.seconds.items(), key=lambda kv: -kv[1])},
            "loop_cpu_ms_per_item": row["loop_cpu_ms_per_item"], "items_per_s": row["items_per_s"],
            # The kernel's share of the process CPU, and the fresh pages it had to fault in.
            "system_ms_per_item": row["system_ms_per_item"], "page_faults_per_item": row["page_faults_per_item"],
            "requests_per_item": row["requests_per_item"], "samples": sampler.samples, "by_category": by,
            "top_functions": top,
            "pool": summary.cache.get("experts", {})}


def format_profile(result: dict[str, Any]) -> str:
    head = (f"CPU per item by category: {result['items']} items at {result['image_size']} px, client "
            f"{result['client']} on {result.get('transport', 'aiohttp')}, concurrency {result['concurrency']}, "
            f"latency {result['latency_s']:g} s, "
            + ("new reference sets" if result["new_sets"] else "reference sets warm")
            + f", {result['compute_slots']} compute slots, {_intra_op(result)}; {result['samples']} samples")
    lines = [head, f"{'category':<24} {'ms/item':>8} {'share':>6}"]
    total = result["cpu_ms_per_item"] or 1.0
    for name, ms in result["by_category"].items():
        lines.append(f"{name:<24} {ms:>8.1f} {ms / total:>6.0%}")
    lines.append(f"{'(the profiler itself)':<24} {result['profiler_ms_per_item']:>8.1f}")
    if result.get("gc_ms_per_item"):
        gc_ms = result["gc_ms_per_item"]
        lines.append(f"{'(garbage collection)':<24} {sum(gc_ms):>8.1f}   (inside the categories; generations 0/1/2: "
                     + "/".join(f"{ms:.2f}" for ms in gc_ms) + " ms/item in "
                     + "/".join(str(n) for n in result["gc_passes"]) + " passes)")
    lines.append(f"{'total (process CPU)':<24} {result['cpu_ms_per_item']:>8.1f}   (event-loop thread "
                 f"{result['loop_cpu_ms_per_item']:.1f} ms/item; {result['items_per_s']:.1f} items/s)")
    if result.get("system_ms_per_item") is not None:
        lines.append(f"{'of it in the kernel':<24} {result['system_ms_per_item']:>8.1f}   "
                     f"({result['page_faults_per_item']} page faults per item: fresh pages the kernel zeroes)")
    if result.get("stages"):
        lines += ["", "compute-thread stages, exact CPU (each compute slot's own thread clock; ms/item, calls/item)"]
        lines += [f"{v['ms_per_item']:>8.2f}  {v['calls_per_item']:>5.2f}  {label}" for label, v in result["stages"].items()]
        lines.append(f"{sum(v['ms_per_item'] for v in result['stages'].values()):>8.2f}         in all "
                     f"(the event-loop thread: {result['loop_cpu_ms_per_item']:.1f})")
    if result.get("top_functions"):
        lines += ["", "functions that decided the most CPU (ms/item)"]
        lines += [f"{r['ms_per_item']:>8.2f}  {r['category']:<22} {r['function']}" for r in result["top_functions"]]
    return "\n".join(lines)


def median_series(values: Sequence[float], digits: int = 1) -> str:
    """Repeated measurements in run order and their median: ``"1.2, 1.5, 1.3 (median 1.3)"``."""
    import statistics

    return ", ".join(f"{v:.{digits}f}" for v in values) + f" (median {statistics.median(values):.{digits}f})"


def _intra_op(result: dict[str, Any]) -> str:
    n = result.get("intra_op_threads", 1)
    return "the libraries' own intra-op threads" if n is None else f"{n} intra-op thread{'s' if n != 1 else ''}"


def format_passes(results: list[dict[str, Any]]) -> str:
    """One line per (client, transport, compute slots, intra-op threads): each pass's CPU per
    item, event-loop CPU per item and items/s, in run order, and their medians (repeated,
    alternating passes are the A/B on a noisy machine)."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        key = (r["client"], r.get("transport", "aiohttp"), r["compute_slots"], _intra_op(r))
        groups.setdefault(key, []).append(r)
    lines = ["passes (CPU ms per item, event-loop ms per item, items/s; median)"]

    def series(rows: list[dict[str, Any]], key: str) -> str:
        return median_series([r[key] for r in rows])

    for (client, transport, slots, intra), rows in groups.items():
        lines.append(f"  {client:<10} {transport:<8} {slots:>3} compute slots, {intra}: "
                     f"{series(rows, 'cpu_ms_per_item')} ms; "
                     f"loop {series(rows, 'loop_cpu_ms_per_item')} ms; {series(rows, 'items_per_s')} items/s")
    return "\n".join(lines)
