"""Speed benchmarks of the runner path (``anomalyclaw bench``), each figure a ratio against a limit
or a baseline measured in the same run.

- **throughput**: the runner (``openai`` backend, default :class:`AgentConfig`) against the fake
  endpoint run in its own process with a fixed latency per request, at several concurrencies;
  ratio = items/s divided by the ideal ``concurrency / (requests per item x latency)``. Items are
  copies (new ids) of the synthetic benchmark's items; the reference sets are calibrated once
  beforehand (a warm-up pass), so the figure is the steady state of a long run, where reference
  sets repeat. CPU per item (all threads) and event-loop CPU per item say where the ceiling is.
- **request bytes**: requests, bytes and images per item with ``image_history="once"`` (the
  default) against ``"all"``, and against a naive client (every image of the history each turn,
  PNG, full size).
- **tools**: latency of each tool (:func:`bench_tools.run_tool_benchmark`).
- **experts**: fit time per reference set and score time per item of the fusion's expert on the
  ``classic`` backbone, and the hit rates of the expert pool and the image encoder over one pass;
  with the CrossDomainVAD-12 manifests at hand, how often reference sets and images repeat there.
- **demo**: ``anomalyclaw demo`` end to end (generate + run + eval) in a fresh process.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.items import Item
from anomalyclaw.loops import resolve_loop, run_loop

log = logging.getLogger(__name__)

#: Requests per item with the fake endpoint's default replies: direct, propose, refute.
NOMINAL_REQUESTS_PER_ITEM = 3


#: ``bench scale --modes`` names -> the scale rows' modes.
SCALE_MODES = {"process": "1 process", "workers": "workers 2", "ray": "ray 2"}


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """What to measure and how much. :func:`quick_plan` and :func:`full_plan` are the two the
    command line offers; tests use a tiny one."""

    latencies_s: tuple[float, ...] = (0.1, 1.0)
    concurrencies: tuple[int, ...] = (1, 8, 32, 128)
    items_per_slot: int = 4
    """Items per run = ``items_per_slot x concurrency`` (at least ``min_items``), so start-up
    and the tail of the run do not dominate."""
    min_items: int = 4
    image_size: int = 512
    """Side of the synthetic images in pixels (the agent's default work side)."""
    n_test_per_domain: int = 4
    """Distinct items per synthetic domain; throughput runs copy them."""
    domains: tuple[str, ...] | None = None
    """Synthetic domains to draw items from (None: all seven)."""
    compare_sdk: tuple[tuple[float, int], ...] = ((0.1, 32), (1.0, 32))
    """(latency, concurrency) points at which to also run the ``sdk`` client (the default
    client is ``langchain``: ``ChatOpenAI``)."""
    tool_repeats: int = 10
    """Warm calls per tool; 0 skips the tool section."""
    new_sets: int = 48
    """Items with a new reference set each (10 references) for the expert-fit case; 0 skips it."""
    demo: bool = True
    scale_latency_s: float = 1.0
    scale_concurrencies: tuple[int, ...] = (32, 128, 256)
    """Concurrencies of the scale rows (one process, ``--workers 2``, Ray with 2 workers); ()
    skips them."""
    scale_modes: tuple[str, ...] = tuple(SCALE_MODES.values())
    scale_items_per_slot: int = 4
    scale_items: int | None = None
    """Items per scale row (None: ``scale_items_per_slot x concurrency``): e.g. 1,418, a whole
    CrossDomainVAD-12 test split, where the start and the tail weigh what they weigh in a real run."""
    scale_transports: tuple[str, ...] = ("aiohttp",)
    """The endpoint clients' HTTP stacks of the scale rows (:attr:`EndpointConfig.transport`), a
    row each."""
    scale_loops: tuple[str, ...] = ("auto",)
    """The event loops of the scale rows (:mod:`anomalyclaw.loops`), a row each."""


def quick_plan() -> BenchPlan:
    """About two minutes on a 2-core machine: no concurrency 128, fewer tool calls, no scale rows."""
    return BenchPlan(concurrencies=(1, 8, 32), tool_repeats=3, new_sets=12, scale_concurrencies=())


def scale_plan(concurrencies: Sequence[int] | None = None, modes: Sequence[str] | None = None,
               items: int | None = None, transports: Sequence[str] | None = None,
               loops: Sequence[str] | None = None) -> BenchPlan:
    """Only the scale rows (``anomalyclaw bench scale``): 1 s latency, by default concurrency
    32, 128 and 256, with one process, ``--workers 2`` and Ray with 2 workers (about eight
    minutes on a 2-core machine). ``modes``: names of :data:`SCALE_MODES`; ``items``: items per
    row instead of 4 per slot of concurrency; ``transports``: HTTP stacks, each mode's row once
    per stack (default aiohttp alone); ``loops``: event loops, each row once per loop, next to
    each other (default ``auto``; ``asyncio,uvloop`` compares)."""
    unknown = sorted(set(modes or ()) - set(SCALE_MODES))
    if unknown:
        raise ValueError(f"bench scale --modes: unknown {', '.join(unknown)} (choose from {', '.join(SCALE_MODES)})")
    for name in loops or ():
        resolve_loop(name)  # unknown, or uvloop where it is not installed: before any row
    return BenchPlan(latencies_s=(), concurrencies=(), compare_sdk=(), tool_repeats=0, new_sets=0, demo=False,
                     scale_concurrencies=tuple(concurrencies or BenchPlan.scale_concurrencies),
                     scale_modes=tuple(SCALE_MODES[m] for m in modes or SCALE_MODES), scale_items=items,
                     scale_transports=tuple(transports or BenchPlan.scale_transports),
                     scale_loops=tuple(loops or BenchPlan.scale_loops))


def full_plan() -> BenchPlan:
    """Every concurrency, 8 items per slot; about seven minutes on a 2-core machine."""
    return BenchPlan(items_per_slot=8)


# ------------------------------------------------------------------------------ the endpoint
@contextmanager
def fake_endpoint_process(latency_s: float) -> Iterator[str]:
    """The fake endpoint in a child process (so its CPU does not share this process's GIL);
    yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "anomalyclaw.graph.vlm.fake_server", "--port", "0",
                             "--latency", str(latency_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the fake endpoint did not start: {url!r} {proc.stderr.read()[-500:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _vlm(url: str, concurrency: int, client: str = "langchain", transport: str = "aiohttp"):
    from anomalyclaw.graph.vlm import make_vlm

    endpoint = EndpointConfig(base_url=url, model="fake-vlm", timeout_s=120.0, max_retries=2, client=client,
                              transport=transport)
    return make_vlm("openai", endpoint, max_concurrency=concurrency)


def copies(items: Sequence[Item], n: int) -> list[Item]:
    """``n`` items cycling through ``items``, each copy with a new id (``<id>~<k>``)."""
    return [dataclasses.replace(items[i % len(items)], item_id=f"{items[i % len(items)].item_id}~{i // len(items)}")
            for i in range(n)]


def process_usage() -> dict[str, float] | None:
    """This process's kernel CPU seconds, minor page faults and context switches (voluntary and
    involuntary, all threads) so far; None without ``resource`` (not on POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"system_s": ru.ru_stime, "faults": ru.ru_minflt, "switches": ru.ru_nvcsw + ru.ru_nivcsw}


def _run(items: Sequence[Item], vlm: Any, out_dir: Path, config: AgentConfig, pool: Any, *,
         progress: bool = False) -> dict[str, Any]:
    """One runner pass; the summary plus the CPU it took (process and event-loop thread), and
    per item the kernel's share of that CPU, the fresh pages it faulted in and the context
    switches (None without ``resource``). ``progress``: with the progress bar a command-line
    run shows (drawn to standard error)."""
    from anomalyclaw.eval.running.runner import Runner, run_sync

    runner = Runner(vlm, out_dir=out_dir, config=config, expert_pool=pool, progress=progress)
    usage0 = process_usage()
    cpu, loop_cpu, wall = time.process_time(), time.thread_time(), time.perf_counter()
    summary = run_sync(runner, items)  # asyncio.run's loop runs on this thread
    wall, cpu, loop_cpu = (time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - loop_cpu)
    usage1 = process_usage()
    done = max(1, summary.n_done)
    return {"items": summary.n_done, "errors": summary.n_errors, "elapsed_s": round(wall, 3),
            "items_per_s": round(summary.n_done / wall, 3), "steady_items_per_s": steady_rate(finish_times(out_dir)),
            "requests_per_item": round(summary.requests / done, 3),
            "request_kb_per_item": round(summary.request_bytes / done / 1024, 1),
            "cpu_ms_per_item": round(cpu / done * 1000, 1), "loop_cpu_ms_per_item": round(loop_cpu / done * 1000, 1),
            "loop_busy": round(loop_cpu / wall, 3) if wall > 0 else None,
            "system_ms_per_item": round(1000 * (usage1["system_s"] - usage0["system_s"]) / done, 1) if usage0 else None,
            "page_faults_per_item": round((usage1["faults"] - usage0["faults"]) / done) if usage0 else None,
            "switches_per_item": round((usage1["switches"] - usage0["switches"]) / done) if usage0 else None,
            "summary": summary}


def _forget_shared_setup() -> None:
    """Drop what runs in one process share once made (the HTTP clients' TLS context, the
    compiled pipeline, the tools' JSON schemas), so that the next run makes them again, as
    every run did before they were shared."""
    from anomalyclaw.graph.pipeline import shared_pipeline
    from anomalyclaw.graph.vlm.endpoint import _tls_context_for
    from anomalyclaw.tools.factory import _model_schema

    for cached in (_tls_context_for, shared_pipeline, _model_schema):
        cached.cache_clear()


def bench_run_start(url: str, pool: Any, work: Path, *, rounds: int = 5) -> dict[str, Any]:
    """CPU of a run's start and end around no items: the VLM client, the Runner (its pipeline,
    tools, prompts) and an empty pass, ``rounds`` times with nothing shared yet (each run made
    its own, as before) alternating with the process's shared setup; the medians."""
    import statistics

    from anomalyclaw.eval.running.runner import Runner, run_sync

    ms: dict[str, list[float]] = {"made anew": [], "shared": []}
    for r in range(rounds):
        for variant in ms:
            if variant == "made anew":
                _forget_shared_setup()
            cpu = time.process_time()
            runner = Runner(_vlm(url, 8), out_dir=work / f"start-{variant.replace(' ', '-')}-{r}", expert_pool=pool,
                            progress=False)
            run_sync(runner, [])
            ms[variant].append(1000 * (time.process_time() - cpu))
    medians = {variant: round(statistics.median(values), 1) for variant, values in ms.items()}
    return {"rounds": rounds, "cpu_ms": {v: [round(x, 1) for x in values] for v, values in ms.items()},
            "median_ms": medians, "ratio": round(medians["made anew"] / max(medians["shared"], 1e-9), 2)}


def _machine_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy (every process, every core; /proc/stat),
    None where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _busy_fraction(machine0: float | None, machine1: float | None, wall: float) -> float | None:
    """The machine's busy CPU between two :func:`_machine_cpu_s` readings over ``wall`` seconds
    and every core (None without both readings)."""
    if machine0 is None or machine1 is None or wall <= 0:
        return None
    return (machine1 - machine0) / (wall * (os.cpu_count() or 1))


def _run_scaled(items: Sequence[Item], vlm: Any, out_dir: Path, config: AgentConfig, pool: Any,
                mode: str, loop: str | None = None) -> dict[str, Any]:
    """One runner pass in one of the scale modes; CPU per item counts this process and, for the
    workers, what each reports having spent after its start-up; ``machine_busy`` is the whole
    machine's (the fake endpoint and Ray's own processes included)."""
    from anomalyclaw.eval.running.runner import Runner, run_sync

    if mode == "1 process":
        runner: Runner = Runner(vlm, out_dir=out_dir, config=config, expert_pool=pool, progress=False)
    else:
        from anomalyclaw.eval.running.workers import ShardedRunner

        kind, n = mode.split()
        runner = ShardedRunner(vlm, workers=int(n), ray="" if kind == "ray" else False, out_dir=out_dir,
                               config=config, progress=False)
    machine0, cpu, wall, began = _machine_cpu_s(), time.process_time(), time.perf_counter(), time.time()
    summary = run_sync(runner, items, loop=loop)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    machine1 = _machine_cpu_s()
    finished = finish_times(out_dir)
    workers_cpu = float(summary.workers.get("cpu_s") or 0.0)
    done = max(1, summary.n_done)
    busy = _busy_fraction(machine0, machine1, wall)
    return {"mode": mode, "loop": resolve_loop(loop), "items": summary.n_done, "errors": summary.n_errors,
            "elapsed_s": round(wall, 3),
            "items_per_s": round(summary.n_done / wall, 3), "steady_items_per_s": steady_rate(finished),
            # The row's start as an item pays it: the workers' start, the first wave's cold work,
            # then the item's own requests one after another (3 x the latency at the least).
            "first_record_s": round(finished[0] - began, 2) if finished else None,
            "requests_per_item": round(summary.requests / done, 3),
            "cpu_ms_per_item": round((cpu + workers_cpu) / done * 1000, 1),
            "machine_busy": round(busy, 3) if busy is not None else None,
            "respawns": summary.workers.get("respawns", 0),
            # Reference sets the workers' expert pools fitted (each worker fits those it meets;
            # the one-process rows share the warm-up's pool, which fits none).
            "sets_fitted": (summary.cache.get("experts") or {}).get("sets") if mode != "1 process" else 0}


#: The bare client's request body in the scale rows' baseline: about the runner's mean request
#: (686 KB per item over 3 requests with the default image policy, README "Request bytes per item").
BARE_REQUEST_KB = 230
BARE_CLIENT = "no agent"


def bare_client_row(url: str, concurrency: int, n_items: int) -> dict[str, Any]:
    """The scale rows' baseline: what the fake endpoint and the loopback allow with no agent in
    the way. A bare aiohttp client sends ``n_items x 3`` chat requests of ~:data:`BARE_REQUEST_KB`
    (one image data URL each) with ``concurrency`` in flight; figures per 3 requests, as an item
    of the runner's rows makes them, so its ``ratio`` is the ceiling of theirs."""
    import asyncio
    import base64

    import aiohttp

    n = NOMINAL_REQUESTS_PER_ITEM * n_items
    image = base64.b64encode(os.urandom(BARE_REQUEST_KB * 768)).decode()  # 4/3 of it: the KB asked
    # One body for every request: the client does as little as a client can.
    body = json.dumps({"model": "fake-vlm", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a bare request"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}}]}]}).encode()

    async def main() -> tuple[int, int]:
        slots, done, failed = asyncio.Semaphore(concurrency), 0, 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def one() -> None:
                nonlocal done, failed
                async with slots:
                    async with session.post(f"{url}/chat/completions", data=body,
                                            headers={"Content-Type": "application/json"}) as reply:
                        await reply.read()
                        done, failed = done + (reply.status == 200), failed + (reply.status != 200)

            await asyncio.gather(*(one() for _ in range(n)))
        return done, failed

    machine0, cpu, wall = _machine_cpu_s(), time.process_time(), time.perf_counter()
    done, failed = run_loop(main())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    machine1 = _machine_cpu_s()
    items = done / NOMINAL_REQUESTS_PER_ITEM
    busy = _busy_fraction(machine0, machine1, wall)
    return {"mode": BARE_CLIENT, "loop": resolve_loop(None), "items": round(items, 1), "errors": failed,
            "elapsed_s": round(wall, 3),
            "items_per_s": round(items / wall, 3), "steady_items_per_s": None, "first_record_s": None,
            "requests_per_item": float(NOMINAL_REQUESTS_PER_ITEM),
            "cpu_ms_per_item": round(cpu / max(items, 1e-9) * 1000, 1),
            "machine_busy": round(busy, 3) if busy is not None else None, "respawns": 0, "sets_fitted": None}


def finish_times(run_dir: Path) -> list[float]:
    """The POSIX times at which the run's records were finished, in order (records without a
    ``finished_at``, or unreadable, left out)."""
    from datetime import datetime

    from anomalyclaw.eval.running.records import RECORDS_FILE, iter_jsonl

    return sorted(datetime.fromisoformat(obj["finished_at"]).timestamp()
                  for _, obj, problem in iter_jsonl(run_dir / RECORDS_FILE) if not problem and obj.get("finished_at"))


def steady_rate(times: Sequence[float], low: float = 0.2, high: float = 0.8, min_items: int = 20) -> float | None:
    """Items per second while the run is in full swing: the least-squares slope of items
    finished against their finish ``times`` (sorted, as :func:`finish_times` gives them), over
    the items between the ``low`` and ``high`` quantiles of the finish order. It leaves out the ramp-up of the first items and the tail of the last ones
    (a fixed-size batch has both; a 1,418-item run barely does); the fit, rather than two end
    points, averages over the bursts in which items finish. None below ``min_items`` items."""
    import numpy as np

    if len(times) < min_items:
        return None
    i, j = int(low * (len(times) - 1)), int(high * (len(times) - 1))
    t = np.asarray(times[i:j + 1]) - times[i]
    if t[-1] <= 0:
        return None
    slope = np.polyfit(t, np.arange(len(t), dtype=float), 1)[0]
    return round(float(slope), 3)


# ------------------------------------------------------------------------------ sections
def slot_ceiling(n_items: float, concurrency: int, requests_per_item: float = NOMINAL_REQUESTS_PER_ITEM, *,
                 one_deep: bool = False) -> float:
    """The best ``ratio`` a client can reach on ``n_items`` with ``concurrency`` slots when every
    request takes the same time: a slot holds an item for its requests one after another, so the
    run lasts ``ceil(n / concurrency)`` items' worth of requests, not ``n / concurrency`` (1,418
    items at 128: 12 rounds for 11.08 of work, 0.923). ``one_deep``: a slot holds one request,
    not an item (the bare client's ``n x requests`` requests)."""
    work = n_items * requests_per_item if one_deep else n_items
    if work <= 0 or concurrency <= 0:
        return 1.0
    return work / (concurrency * math.ceil(work / concurrency - 1e-9))


def _rated(row: dict[str, Any], latency: float, concurrency: int, **where: Any) -> dict[str, Any]:
    """``row`` with its place (``latency_s``, ``concurrency`` and ``where``) and its rates against
    the ideal ``concurrency / (requests per item x latency)``: ``ratio`` and ``steady_ratio``, and
    ``ceiling``, the best ratio the row's items allow (:func:`slot_ceiling`)."""
    ideal = concurrency / (max(row["requests_per_item"], 1e-9) * latency)
    steady = row["steady_items_per_s"]
    ceiling = slot_ceiling(row["items"], concurrency, row["requests_per_item"], one_deep=row.get("mode") == BARE_CLIENT)
    return {"latency_s": latency, "concurrency": concurrency, **where,
            "ideal_items_per_s": round(ideal, 3), "ratio": round(row["items_per_s"] / ideal, 3),
            "steady_ratio": round(steady / ideal, 3) if steady else None, "ceiling": round(ceiling, 3), **row}


def bench_throughput(items: Sequence[Item], plan: BenchPlan, pool: Any, work: Path) -> list[dict[str, Any]]:
    """One row per (latency, concurrency) and client; see the module docstring."""
    rows = []
    config = AgentConfig()
    runs = [(lat, c, "langchain") for lat in plan.latencies_s for c in plan.concurrencies]
    runs += [(lat, c, "sdk") for lat, c in plan.compare_sdk]
    for latency in sorted({lat for lat, _, _ in runs}):
        with fake_endpoint_process(latency) as url:
            for lat, concurrency, client in runs:
                if lat != latency:
                    continue
                n = max(plan.min_items, plan.items_per_slot * concurrency)
                out = work / f"throughput_{latency:g}s_c{concurrency}_{client}"
                row = _run(copies(items, n), _vlm(url, concurrency, client), out, config, pool)
                row.pop("summary")
                rows.append(_rated(row, latency, concurrency, client=client))
                log.info("throughput %s", rows[-1])
    return rows


def bench_scale(items: Sequence[Item], plan: BenchPlan, pool: Any, work: Path) -> list[dict[str, Any]]:
    """The scale rows: at ``plan.scale_latency_s``, each concurrency with one process, worker
    processes and Ray actors (one local Ray for all its rows; its rows are left out, with the
    reason, when Ray is not installed), after a :func:`bare_client_row` on the same endpoint, the
    ceiling they are read against. Worker rows start cold: each worker fits its own reference
    sets and fills its own caches (the one-process rows share the warm-up's). Their processes fork
    from one fork server, started before the rows as ``anomalyclaw run --workers`` starts it: first
    thing, so that it imports what the workers need while the run sets itself up."""
    latency = plan.scale_latency_s
    rows: list[dict[str, Any]] = []
    if any(m.startswith("workers") for m in plan.scale_modes):
        from anomalyclaw.eval.running.forkserver import start_worker_server

        start_worker_server(wait=True)  # its imports done before any row: they would disturb it
    session = None  # one local Ray for every Ray row, started as `anomalyclaw run --ray` starts it
    if any(m.startswith("ray") for m in plan.scale_modes):
        from anomalyclaw.eval.running.workers import RaySession

        try:
            session = RaySession(num_cpus=os.cpu_count() or 2)
        except AnomalyClawError:  # Ray is not installed
            session = None
        else:
            session.start()
    try:
        with fake_endpoint_process(latency) as url:
            for concurrency in plan.scale_concurrencies:
                n = plan.scale_items or max(plan.min_items, plan.scale_items_per_slot * concurrency)
                # The same endpoint with no agent in the way: the ceiling of this concurrency's rows.
                rows.append(_rated(bare_client_row(url, concurrency, n), latency, concurrency, transport="aiohttp"))
                log.info("scale %s", rows[-1])
                for mode, transport, loop in itertools.product(plan.scale_modes, plan.scale_transports,
                                                               plan.scale_loops):
                    if mode.startswith("ray") and session is None:
                        rows.append({"mode": mode, "concurrency": concurrency, "latency_s": latency,
                                     "transport": transport, "loop": resolve_loop(loop),
                                     "skipped": "Ray is not installed (pip install anomalyclaw[ray])"})
                        continue
                    out = work / f"scale_{latency:g}s_c{concurrency}_{mode.replace(' ', '')}_{transport}_{loop}"
                    row = _run_scaled(copies(items, n), _vlm(url, concurrency, transport=transport), out,
                                      AgentConfig(), pool, mode, loop=loop)
                    rows.append(_rated(row, latency, concurrency, transport=transport))
                    log.info("scale %s", rows[-1])
    finally:
        if session is not None:
            session.close()
    return rows


def format_scale(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["Past one process (openai backend, langchain client, default AgentConfig; worker rows start cold)",
             f"{'latency':>8} {'conc':>5} {'mode':>10} {'http':>8} {'loop':>7} {'items':>6} {'items/s':>8} {'ideal':>8} "
             f"{'ratio':>6} {'steady':>7} {'ceiling':>7} {'first s':>7} {'req/item':>8} {'cpu ms/item':>11} "
             f"{'machine busy':>12} {'sets fit':>8} {'errors':>6}"]
    for r in rows:
        where = (f"{r['latency_s']:>7g}s {r['concurrency']:>5} {r['mode']:>10} {r.get('transport', 'aiohttp'):>8} "
                 f"{r.get('loop', 'asyncio'):>7}")
        if r.get("skipped"):
            lines.append(f"{where}  skipped: {r['skipped']}")
            continue
        steady = f"{r['steady_ratio']:>7.3f}" if r.get("steady_ratio") is not None else f"{'-':>7}"
        busy = f"{r['machine_busy']:>12.2f}" if r.get("machine_busy") is not None else f"{'-':>12}"
        fits = f"{r['sets_fitted']:>8}" if r.get("sets_fitted") is not None else f"{'-':>8}"
        first = f"{r['first_record_s']:>7.2f}" if r.get("first_record_s") is not None else f"{'-':>7}"
        lines.append(f"{where} {r['items']:>6g} "
                     f"{r['items_per_s']:>8.2f} {r['ideal_items_per_s']:>8.2f} {r['ratio']:>6.3f} {steady} {r['ceiling']:>7.3f} "
                     f"{first} {r['requests_per_item']:>8.2f} {r['cpu_ms_per_item']:>11.1f} {busy} {fits} {r['errors']:>6}")
    lines.append("ceiling = the best ratio these items allow at this concurrency, every request taking the "
                 "latency (a slot holds an item's requests one after another: ceil(items / concurrency) rounds); "
                 "first s = seconds from the row's start to its first record; "
                 "cpu ms/item = this process + the workers after their start-up; machine busy = every "
                 "process's CPU (the fake endpoint's and Ray's own too) / (wall time x cores); sets fit = "
                 "reference sets the workers' expert pools fitted (the one-process rows use the warm-up's); "
                 f"{BARE_CLIENT} = the same endpoint driven by a bare aiohttp client, no agent (~{BARE_REQUEST_KB} KB "
                 "requests, counted 3 to an item): the ceiling of the rows below it")
    return "\n".join(lines)


def bench_request_bytes(items: Sequence[Item], work: Path) -> list[dict[str, Any]]:
    """Requests, KB and images per item under three image policies, on the same items."""
    policies = {
        "once (default)": AgentConfig(),
        "all": AgentConfig(image_history="all"),
        "naive: all, PNG, full size": AgentConfig(image_history="all", image_format="PNG",
                                                   image_side=4096, reference_side=4096),
    }
    rows = []
    with fake_endpoint_process(0.0) as url:
        for k, (name, config) in enumerate(policies.items()):
            out = work / f"bytes_{k}"
            # No expert term: it does not change what is sent, only how long an item takes.
            row = _run(items, _vlm(url, 8), out, dataclasses.replace(config, expert_score=False), None)
            summary = row.pop("summary")
            images = sum(_images_sent(out)) / max(1, summary.n_done)
            rows.append({"policy": name, "requests_per_item": row["requests_per_item"],
                         "request_kb_per_item": row["request_kb_per_item"], "images_per_item": round(images, 2),
                         "errors": row["errors"]})
    base = rows[0]["request_kb_per_item"] or 1.0
    for row in rows:
        row["bytes_vs_once"] = round(row["request_kb_per_item"] / base, 3)
    return rows


def _images_sent(run_dir: Path) -> Iterator[int]:
    from anomalyclaw.eval.running.records import RECORDS_FILE, iter_jsonl

    for _, obj, problem in iter_jsonl(run_dir / RECORDS_FILE):
        if not problem:
            yield int((obj.get("usage") or {}).get("images_sent") or 0)


def bench_experts(items: Sequence[Item], work_side: int = 512) -> dict[str, Any]:
    """The fusion's expert on the classic backbone, one cold pass over ``items``: fit time per
    new reference set, score time per item, and how often the pool served a fitted set; the
    same pass with the per-image feature cache off is the baseline for its fit time."""
    from anomalyclaw.experts.pool import ExpertPool, default_params
    from anomalyclaw.experts.pool import DEFAULT_EXPERT as EXPERT
    from anomalyclaw.tools.item_context import ItemContext

    contexts = [ItemContext(item, work_side=work_side).preload() for item in items]  # decoding is not a fit

    def one_pass(pool: ExpertPool) -> tuple[list[float], list[float]]:
        _ = pool.backbone  # loading the backbone is not a fit
        fits, scores = [], []
        for item, ctx in zip(items, contexts):
            misses = pool.stats["misses"]
            start = time.perf_counter()
            expert = pool.expert(EXPERT, item.reference_set_key, lambda: ctx.references,
                                 **default_params(EXPERT, item.traits))
            fitted = time.perf_counter() - start
            if pool.stats["misses"] > misses:
                fits.append(fitted)
            start = time.perf_counter()
            expert.score(ctx.query)
            scores.append(time.perf_counter() - start)
        return fits, scores

    per_set = ExpertPool("classic", max_feature_mb=0)
    base_fits, _ = one_pass(per_set)
    pool = ExpertPool("classic")
    fits, scores = one_pass(pool)
    unique_images = {str(p) for it in items for p in it.ref_paths}
    slots = sum(len(it.ref_paths) for it in items)
    fit_ms = 1000 * sum(fits) / max(1, len(fits))
    base_ms = 1000 * sum(base_fits) / max(1, len(base_fits))
    return {"backbone": "classic", "expert": EXPERT, "items": len(items), "work_side": work_side,
            "fit_ms_per_set": round(fit_ms, 1), "sets_fitted": len(fits),
            "fit_ms_per_set_without_image_cache": round(base_ms, 1),
            "fit_speedup_from_image_cache": round(base_ms / fit_ms, 2) if fit_ms else None,
            "score_ms_per_item": round(1000 * sum(scores) / max(1, len(scores)), 1),
            "reference_slots": slots, "unique_reference_images": len(unique_images),
            "pool": pool.stats, "knn": bench_knn(pool.backbone, contexts)}


def bench_knn(backbone: Any, contexts: Sequence[Any], bank_images: int = 10, repeats: int = 10) -> dict[str, Any]:
    """The patch kNN search of the first query against a bank of ``bank_images`` references
    (the first that many of the contexts' references: a 10-reference set is the new-set case,
    CrossDomainVAD-12 averages 8.5), the classic backbone's patches, with the bank in
    :data:`~anomalyclaw.experts.patchknn.BANK_TILE`-row blocks and in one block, alternating,
    one thread: median CPU ms per search, and the largest difference between the two's
    distances (0 here: each distance is the same dot product either way)."""
    import statistics

    import numpy as np

    from anomalyclaw.experts.patchknn import BANK_TILE, nearest_distances
    from anomalyclaw.threads import limit_compute_threads

    query = backbone.patch_features([contexts[0].query])
    dim = query.shape[-1]
    query = query.reshape(-1, dim)
    references = [image for ctx in contexts for image in ctx.references][:bank_images]
    bank = backbone.patch_features(references).reshape(-1, dim)
    times: dict[Any, list[float]] = {BANK_TILE: [], None: []}
    with limit_compute_threads(1):
        diff = float(np.abs(nearest_distances(query, bank) - nearest_distances(query, bank, bank_tile=None)).max())
        for _ in range(repeats):
            for tile in times:
                start = time.thread_time()
                nearest_distances(query, bank, bank_tile=tile)
                times[tile].append(time.thread_time() - start)
    tiled, whole = (1000 * statistics.median(times[t]) for t in (BANK_TILE, None))
    return {"query_patches": query.shape[0], "bank_patches": bank.shape[0], "dim": dim, "tile": BANK_TILE,
            "tiled_ms": round(tiled, 2), "one_block_ms": round(whole, 2),
            "speedup": round(whole / tiled, 2) if tiled else None, "max_difference": diff}


def reference_reuse(manifest: Path, split: str = "test") -> dict[str, Any] | None:
    """How often reference sets and images repeat in a manifest (no image is read): the best
    hit rates a per-set and a per-image feature cache can reach over one pass."""
    try:
        rows = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if isinstance(r, dict) and r.get("split") == split and r.get("ref_paths")]
    if not rows:
        return None
    sets = {tuple(r["ref_paths"]) for r in rows}
    images = {p for r in rows for p in r["ref_paths"]}
    slots = sum(len(r["ref_paths"]) for r in rows)
    return {"manifest": str(manifest), "split": split, "items": len(rows), "unique_sets": len(sets),
            "set_hit_rate": round(1 - len(sets) / len(rows), 3), "reference_slots": slots,
            "unique_images": len(images), "image_hit_rate": round(1 - len(images) / slots, 3)}


def bench_demo(work: Path) -> dict[str, Any]:
    """``anomalyclaw demo`` in a fresh process (imports, generation, run, AUROC): wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomalyclaw", "demo", "--out", str(work / "demo"),
                           "--no-progress", "--json"], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"wall_s": round(wall, 1), "returncode": proc.returncode}
    if proc.returncode == 0:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update(items=result.get("n_items"), items_per_s=result.get("items_per_s"),
                   macro_auroc=result.get("macro_auroc"))
    else:
        out["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    return out


# ------------------------------------------------------------------------------ the whole bench
def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m": round(load[0], 2) if load else None}


def run_bench(plan: BenchPlan | None = None, *, work_dir: str | os.PathLike | None = None,
              reference_manifest: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every section of ``plan`` (default: :func:`quick_plan`) and return the results."""
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.experts.pool import ExpertPool

    plan = plan or quick_plan()
    started = time.perf_counter()
    result: dict[str, Any] = {"plan": dataclasses.asdict(plan), "machine_before": machine()}
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-bench-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        manifest = generate_benchmark(work / "synth", seed=0, n_test_per_domain=plan.n_test_per_domain,
                                      n_calibration=0, n_dev=0, size=plan.image_size,
                                      domains=list(plan.domains) if plan.domains else None)
        items = load_manifest(manifest, split="test")
        # Warm-up: every reference set calibrated once (tools' caches, the expert pool), so the
        # throughput runs measure the steady state of a long run; its own cost is reported too.
        pool = ExpertPool("classic")
        with fake_endpoint_process(0.0) as url:
            warm = _run(items, _vlm(url, 8), work / "warmup", AgentConfig(), pool)
            if plan.latencies_s:  # (the scale plan measures nothing else)
                result["run_start"] = bench_run_start(url, pool, work)
        summary = warm.pop("summary")
        result["warmup"] = {**warm, "pool": dict(summary.cache.get("experts", {})),
                            "encoder": dict(summary.cache.get("images", {}))}
        result["throughput"] = bench_throughput(items, plan, pool, work)
        if plan.scale_concurrencies:
            result["scale"] = bench_scale(items, plan, pool, work)
        if plan.latencies_s:  # (the scale plan measures nothing else)
            result["request_bytes"] = bench_request_bytes(items, work)
            result["experts"] = bench_experts(items)
        if plan.new_sets:
            from anomalyclaw.eval.bench.reference_sets import bench_new_sets

            result["new_sets"] = bench_new_sets(work, n_sets=plan.new_sets, size=plan.image_size,
                                                **({"domains": plan.domains} if plan.domains else {}))
        reference = Path(reference_manifest) if reference_manifest else _default_reference_manifest()
        result["reference_reuse"] = reference_reuse(reference) if reference is not None else None
        if plan.tool_repeats:
            from anomalyclaw.eval.bench.tools import run_tool_benchmark

            result["tools"] = run_tool_benchmark(plan.image_size, plan.tool_repeats)
        if plan.demo:
            result["demo"] = bench_demo(work)
    result["machine_after"] = machine()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def _default_reference_manifest() -> Path | None:
    """The CrossDomainVAD-12 manifest beside the repository (``../shared``), when present."""
    path = (Path(__file__).resolve().parents[2] / "shared" / "reference" / "crossdomainvad12" / "manifests"
            / "full_manifest.json")
    return path if path.is_file() else None


# ------------------------------------------------------------------------------ the table
def format_bench(result: dict[str, Any]) -> str:
    """The bench's results as the text table ``anomalyclaw bench`` prints."""
    m = result["machine_before"]
    lines = [f"machine: {m['cpus']} CPUs, Python {m['python']}, load {m['load_avg_1m']} -> "
             f"{result['machine_after']['load_avg_1m']}; bench took {result['elapsed_s']} s",
             "", "Runner throughput against the fake endpoint (openai backend, default AgentConfig, "
             f"{result['plan']['image_size']} px synthetic items, reference sets warm)",
             f"{'latency':>8} {'conc':>5} {'client':>9} {'items':>6} {'items/s':>8} {'ideal':>8} {'ratio':>6} "
             f"{'steady':>7} {'req/item':>8} {'cpu ms/item':>11} {'loop ms/item':>12} {'loop busy':>9} {'errors':>6}"]
    for r in result["throughput"]:
        steady = f"{r['steady_ratio']:>7.3f}" if r.get("steady_ratio") is not None else f"{'-':>7}"
        lines.append(f"{r['latency_s']:>7g}s {r['concurrency']:>5} {r['client']:>9} {r['items']:>6} "
                     f"{r['items_per_s']:>8.2f} {r['ideal_items_per_s']:>8.2f} {r['ratio']:>6.3f} {steady} "
                     f"{r['requests_per_item']:>8.2f} {r['cpu_ms_per_item']:>11.1f} {r['loop_cpu_ms_per_item']:>12.1f} "
                     f"{r['loop_busy']:>9.2f} {r['errors']:>6}")
    lines.append("ratio = items/s / ideal, ideal = concurrency / (requests per item x latency); steady = the "
                 "same for the rate fitted between the 20th and 80th percentile finishes (a long run's rate); "
                 "loop busy = the event-loop thread's CPU time / wall time")
    if result.get("scale"):
        lines += ["", format_scale(result["scale"])]
    w = result["warmup"]
    lines += [f"cold pass (warm-up, {w['items']} items, concurrency 8, no latency): {w['items_per_s']:.2f} items/s, "
              f"{w['cpu_ms_per_item']:.0f} ms CPU per item; expert pool {w['pool']}; "
              f"image encoder {w['encoder']}"]
    if result.get("run_start"):
        st = result["run_start"]
        lines.append(f"a run's start and end around no items (VLM client, Runner, empty pass), CPU ms, "
                     f"{st['rounds']} rounds alternating: made anew {st['median_ms']['made anew']:.1f} (as every run "
                     f"before), with the process's shared TLS context, pipeline and tool schemas "
                     f"{st['median_ms']['shared']:.1f} ({st['ratio']:.2f}x)")
    if not result.get("request_bytes"):  # the scale plan measures nothing else
        return "\n".join(lines)
    lines += ["", "Request size per item (same items, no latency)",
              f"{'image policy':<28} {'req/item':>8} {'KB/item':>9} {'images/item':>11} {'vs once':>8}"]
    for r in result["request_bytes"]:
        lines.append(f"{r['policy']:<28} {r['requests_per_item']:>8.2f} {r['request_kb_per_item']:>9.1f} "
                     f"{r['images_per_item']:>11.2f} {r['bytes_vs_once']:>7.2f}x")
    e = result["experts"]
    lines += ["", f"Expert {e['expert']} ({e['backbone']} backbone, {e['work_side']} px): "
              f"fit {e['fit_ms_per_set']:.0f} ms per reference set ({e['sets_fitted']} sets; "
              f"{e['fit_ms_per_set_without_image_cache']:.0f} ms without the per-image feature cache, "
              f"{e['fit_speedup_from_image_cache']}x), score {e['score_ms_per_item']:.0f} ms per item; "
              f"{e['unique_reference_images']} distinct reference images in {e['reference_slots']} slots, "
              f"{e['pool']['image_hits']} image features reused"]
    knn = e.get("knn")
    if knn:
        lines.append(f"Nearest-neighbour search ({knn['query_patches']} query patches x {knn['bank_patches']} bank "
                     f"patches, D {knn['dim']}, one thread): {knn['tiled_ms']:.1f} ms with the bank in "
                     f"{knn['tile']}-row blocks against {knn['one_block_ms']:.1f} ms in one block "
                     f"({knn['speedup']}x; distances differ by at most {knn['max_difference']:.1g})")
    if result.get("new_sets"):
        from anomalyclaw.eval.bench.reference_sets import format_new_sets

        lines += ["", format_new_sets(result["new_sets"])]
    reuse = result.get("reference_reuse")
    if reuse:
        lines.append(f"CrossDomainVAD-12 {reuse['split']} ({reuse['items']} items): {reuse['unique_sets']} distinct "
                     f"reference sets (a per-set cache hits {reuse['set_hit_rate']:.0%}), {reuse['unique_images']} "
                     f"distinct images in {reuse['reference_slots']} slots (a per-image cache hits "
                     f"{reuse['image_hit_rate']:.0%})")
    if result.get("tools"):
        lines += ["", f"Tool latency at {result['plan']['image_size']} px (warm calls)",
                  f"{'tool':<22} {'median ms':>10} {'p95 ms':>8} {'first ms':>9}"]
        for r in result["tools"]:
            if "median_ms" in r:
                lines.append(f"{r['tool']:<22} {r['median_ms']:>10.1f} {r['p95_ms']:>8.1f} {r['first_ms']:>9.1f}")
            else:
                lines.append(f"{r['tool']:<22} {r.get('error')}")
    if result.get("demo"):
        d = result["demo"]
        lines += ["", f"demo end to end (generate + run + eval, fresh process): {d['wall_s']} s"
                  + (f", {d.get('items')} items" if d.get("items") else f", FAILED: {d.get('error')}")]
    return "\n".join(lines)
