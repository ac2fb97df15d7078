"""``anomalyclaw bench slots``: the compute-slot setting A/B, without a profiler in the process.

Each pass is a runner pass (the default client against the fake endpoint in its own process,
warm reference sets, as ``anomalyclaw bench`` runs them) under one :func:`~anomalyclaw.threads.
limit_compute_slots` setting; the settings alternate for ``rounds`` rounds, so drift of a shared
machine falls on each alike. Per pass: CPU ms per item (all threads), items/s, the event loop's
CPU per item and the context switches per item. ``bench profile --compute-slots`` compares the
same settings with its sampler, which asks running threads to hand the GIL over sooner and so
changes what is measured here: how often threads wait for the GIL.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from anomalyclaw.config import AgentConfig


def bench_slots(slots: Sequence[int] | None = None, *, rounds: int = 3, n_items: int = 384, concurrency: int = 32,
                latency_s: float = 0.1, image_size: int = 512, work_dir: str | Path | None = None) -> dict[str, Any]:
    """One pass of ``n_items`` per setting in ``slots`` (None: the cores plus one, then the
    default, one per core), alternating, ``rounds`` times. Returns
    ``{"passes": [{"slots", "round", "items", "errors", "cpu_ms_per_item", "items_per_s",
    "loop_cpu_ms_per_item", "switches_per_item"}], "medians": {slots: {...}}, ...}``."""
    from anomalyclaw import threads
    from anomalyclaw.eval.bench.throughput import _run, _vlm, copies, fake_endpoint_process
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.experts.pool import ExpertPool

    if slots is None:
        slots = (threads.default_compute_slots() + 1, threads.default_compute_slots())
    config, passes = AgentConfig(), []
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-slots-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        manifest = generate_benchmark(work / "synth", seed=0, n_test_per_domain=4, n_calibration=0, n_dev=0,
                                      size=image_size)
        items = load_manifest(manifest, split="test")
        pool = ExpertPool("classic")
        with fake_endpoint_process(latency_s) as url:
            _run(items, _vlm(url, 8), work / "warmup", config, pool)  # every set calibrated once
            measured = copies(items, n_items)
            for k in range(rounds):
                for n in slots:
                    with threads.limit_compute_slots(n):
                        row = _run(measured, _vlm(url, concurrency), work / f"slots{n}-{k}", config, pool)
                    passes.append({"slots": n, "round": k, "items": row["items"], "errors": row["errors"],
                                   "cpu_ms_per_item": row["cpu_ms_per_item"], "items_per_s": row["items_per_s"],
                                   "loop_cpu_ms_per_item": row["loop_cpu_ms_per_item"],
                                   "switches_per_item": row["switches_per_item"]})
    keys = ("cpu_ms_per_item", "items_per_s", "loop_cpu_ms_per_item", "switches_per_item")
    medians = {n: {key: statistics.median(p[key] for p in passes if p["slots"] == n)
                   for key in keys if all(p[key] is not None for p in passes)} for n in slots}
    return {"passes": passes, "medians": medians, "items": n_items, "concurrency": concurrency,
            "latency_s": latency_s, "image_size": image_size, "rounds": rounds}


def format_slots(result: dict[str, Any]) -> str:
    """:func:`bench_slots`'s passes and each setting's medians as a table."""
    lines = [f"Compute slots, alternating: {result['rounds']} rounds of {result['items']} items at "
             f"{result['image_size']} px, concurrency {result['concurrency']}, latency {result['latency_s']} s, "
             "default client, reference sets warm",
             f"{'slots':>5s} {'round':>5s} {'cpu ms/item':>11s} {'items/s':>8s} {'loop ms/item':>12s} "
             f"{'switches/item':>13s} {'errors':>6s}"]
    for p in result["passes"]:
        switches = "-" if p["switches_per_item"] is None else str(p["switches_per_item"])
        lines.append(f"{p['slots']:5d} {p['round']:5d} {p['cpu_ms_per_item']:11.1f} {p['items_per_s']:8.2f} "
                     f"{p['loop_cpu_ms_per_item']:12.1f} {switches:>13s} {p['errors']:6d}")
    for n, m in result["medians"].items():
        lines.append(f"median, {n} slot(s): " + ", ".join(f"{key.replace('_', ' ')} {value:g}"
                                                        for key, value in m.items()))
    return "\n".join(lines)
