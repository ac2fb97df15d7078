"""Memory of a long run (``anomalyclaw bench memory``): peak resident memory over a manifest of
thousands of items that reuse a few images, against a run of a tenth as many items measured the
same way in the same bench; and the memory of decoding large images (:func:`measure_decode`),
against the bytes of their decoded pixels.

Each run is ``anomalyclaw run`` (offline backend, default agent settings) in a child process,
sampled every ``sample_s`` from ``/proc/<pid>/status`` (``VmRSS`` and the kernel's high-water mark
``VmHWM``) beside the number of records written so far. Bounded memory shows as a peak ratio near
1 between the long and the short run, and a flat resident size over the second half of the long
run (its slope is reported in MB per 1,000 items). Linux only (``/proc``); elsewhere the peak
comes from ``getrusage(RUSAGE_CHILDREN)`` and there is no growth curve.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalyclaw.eval.bench.throughput import copies
from anomalyclaw.eval.running.records import RECORDS_FILE


def _status(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in MB (empty when /proc is missing or it ended)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


class _LineCounter:
    """Lines of a growing file, read incrementally."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return self.lines
        self.offset += len(chunk)
        self.lines += chunk.count(b"\n")
        return self.lines


def measure_run(manifest: Path, out_dir: Path, *, concurrency: int = 8, sample_s: float = 0.5) -> dict[str, Any]:
    """One ``anomalyclaw run`` in a child process, its resident memory sampled as it goes."""
    import resource

    cmd = [sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out", str(out_dir),
           "--backend", "offline", "--concurrency", str(concurrency), "--no-progress", "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counter = _LineCounter(out_dir / RECORDS_FILE)
    samples: list[tuple[float, int, float]] = []  # (seconds, records written, RSS MB)
    peak = 0.0
    while proc.poll() is None:
        status = _status(proc.pid)
        if status:
            peak = max(peak, status.get("VmHWM", 0.0))
            samples.append((time.perf_counter() - start, counter.count(), status.get("VmRSS", 0.0)))
        time.sleep(sample_s)
    stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the measured run failed (exit {proc.returncode}): {stderr[-1000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    if not peak:  # no /proc: the largest child's peak (this is the only child alive)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"items": summary["n_items"], "errors": summary["n_errors"], "elapsed_s": round(elapsed, 1),
            "items_per_s": round(summary["n_items"] / elapsed, 2), "peak_rss_mb": round(peak, 1),
            "samples": samples}


_MAKE_SCRIPT = """
import sys
import numpy as np
from PIL import Image
folder, n, width, height = sys.argv[1], *map(int, sys.argv[2:])
for k in range(n):
    a = np.zeros((height, width, 3), np.uint8)
    a[:: 50 + k] = 200  # stripes: a few hundred KB of PNG for tens of megapixels
    Image.fromarray(a).save(f"{folder}/decode_{k}.png", compress_level=1)
"""
_LOAD_SCRIPT = """
import glob, resource, sys, threading
import numpy as np
from PIL import Image
from anomalyclaw.imaging import DECODE_BUDGET, load_image
folder, threads, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = sorted(glob.glob(f"{folder}/decode_*.png"))
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))
try:  # reset the kernel's high-water mark to the resident size now (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base, peak = status("VmRSS:"), lambda: status("VmHWM:")
except OSError:
    base, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lock = threading.Semaphore(threads)
def load(p):
    with lock:
        load_image(p, max_side=side)
workers = [threading.Thread(target=load, args=(p,)) for p in paths]
[w.start() for w in workers]
[w.join() for w in workers]
print((peak() - base) / 1024, DECODE_BUDGET.waits)
"""


def measure_decode(n_images: int, width: int, height: int, *, threads: int, max_side: int = 1536,
                   budget_mb: float | None = None) -> dict[str, Any]:
    """Peak extra RSS of loading ``n_images`` PNGs of ``width x height`` (striped, so each file is
    small; written by another process) with ``threads`` threads at once, in a fresh process whose
    high-water mark is taken after its imports; ``ratio_to_pixels`` divides it by the decoded RGB
    bytes of one image (a full decode's floor)."""
    import os

    env = dict(os.environ)
    if budget_mb is not None:
        env["ANOMALYCLAW_DECODE_BUDGET_MB"] = str(budget_mb)
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-bench-decode-") as folder:
        for script, args in ((_MAKE_SCRIPT, [str(n_images), str(width), str(height)]),
                             (_LOAD_SCRIPT, [str(threads), str(max_side)])):
            proc = subprocess.run([sys.executable, "-c", script, folder, *args], capture_output=True, text=True,
                                  env=env, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"the decode measurement failed: {proc.stderr[-1000:]}")
    peak_mb, waits = proc.stdout.split()
    pixels_mb = width * height * 3 / 2**20
    return {"images": n_images, "megapixels": round(width * height / 1e6, 1), "threads": threads,
            "budget_mb": budget_mb, "peak_extra_rss_mb": round(float(peak_mb), 1),
            "decoded_mb_per_image": round(pixels_mb, 1), "ratio_to_pixels": round(float(peak_mb) / pixels_mb, 2),
            "budget_waits": int(waits)}


def run_decode_bench() -> list[dict[str, Any]]:
    """One 72 MP PNG (the issue's 231 KB bomb-shaped file), and eight 16 MP PNGs loaded by eight
    threads under the default budget and under a 64 MB one."""
    return [measure_decode(1, 9000, 8000, threads=1),
            measure_decode(8, 4000, 4000, threads=8),
            measure_decode(8, 4000, 4000, threads=8, budget_mb=64)]


def _growth(samples: list[tuple[float, int, float]]) -> dict[str, Any]:
    """RSS at a tenth, half and all of the records, and its slope over the second half."""
    if len(samples) < 4 or samples[-1][1] == 0:
        return {}
    done = np.array([s[1] for s in samples], float)
    rss = np.array([s[2] for s in samples], float)
    total = done[-1]

    def at(fraction: float) -> float:
        return round(float(rss[int(np.searchsorted(done, fraction * total))]), 1)

    second = done >= total / 2
    slope = None
    if second.sum() >= 3 and np.ptp(done[second]) > 0:
        slope = round(float(np.polyfit(done[second], rss[second], 1)[0] * 1000.0), 1)
    return {"rss_mb_at_10pct": at(0.1), "rss_mb_at_50pct": at(0.5), "rss_mb_at_end": round(float(rss[-1]), 1),
            "rss_growth_mb_per_1000_items_second_half": slope}


def run_memory_bench(n_items: int = 5000, *, baseline_items: int | None = None, image_size: int = 128,
                     domains: tuple[str, ...] = ("S1", "S2"), n_test_per_domain: int = 2, concurrency: int = 8,
                     work_dir: str | Path | None = None, sample_s: float = 0.5, decode: bool = True) -> dict[str, Any]:
    """Peak RSS of a run over ``n_items`` copies of ``len(domains) * n_test_per_domain``
    synthetic items (so a few images, reused), and of a run of ``baseline_items`` (default a
    tenth) the same way; see the module docstring."""
    from anomalyclaw.eval.data.manifests import load_manifest, write_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark

    baseline_items = baseline_items or max(1, n_items // 10)
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-bench-memory-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        synth = generate_benchmark(work / "synth", seed=0, n_test_per_domain=n_test_per_domain, n_calibration=0,
                                   n_dev=0, size=image_size, domains=list(domains))
        items = load_manifest(synth, split="test")
        images = {str(it.query_path) for it in items} | {str(p) for it in items for p in it.ref_paths}
        runs = {}
        for name, n in (("baseline", baseline_items), ("long", n_items)):
            manifest = write_manifest(copies(items, n), work / f"{name}.json")
            runs[name] = measure_run(manifest, work / f"run_{name}", concurrency=concurrency, sample_s=sample_s)
    long, base = runs["long"], runs["baseline"]
    return {"decode": run_decode_bench() if decode else [], "items": long["items"], "baseline_items": base["items"], "distinct_images": len(images),
            "image_size": image_size, "concurrency": concurrency,
            "peak_rss_mb": long["peak_rss_mb"], "baseline_peak_rss_mb": base["peak_rss_mb"],
            "peak_ratio": round(long["peak_rss_mb"] / base["peak_rss_mb"], 3) if base["peak_rss_mb"] else None,
            "errors": long["errors"] + base["errors"], "items_per_s": long["items_per_s"],
            "elapsed_s": long["elapsed_s"] + base["elapsed_s"], **_growth(long["samples"])}


def format_memory(result: dict[str, Any]) -> str:
    lines = [f"peak RSS over {result['items']:,} items ({result['distinct_images']} distinct images, "
             f"{result['image_size']} px, concurrency {result['concurrency']}): {result['peak_rss_mb']:.0f} MB",
             f"peak RSS over {result['baseline_items']:,} items, the same way: {result['baseline_peak_rss_mb']:.0f} MB "
             f"(ratio {result['peak_ratio']})"]
    if "rss_mb_at_10pct" in result:
        lines.append(f"RSS at 10% / 50% / 100% of the long run: {result['rss_mb_at_10pct']:.0f} / "
                     f"{result['rss_mb_at_50pct']:.0f} / {result['rss_mb_at_end']:.0f} MB; growth over its "
                     f"second half: {result['rss_growth_mb_per_1000_items_second_half']} MB per 1,000 items")
    lines.append(f"{result['errors']} error records; {result['items_per_s']} items/s; {result['elapsed_s']:.0f} s")
    for row in result.get("decode", []):
        budget = f"{row['budget_mb']:g} MB" if row["budget_mb"] is not None else "the default"
        lines.append(f"decode: {row['images']} x {row['megapixels']} MP PNG, {row['threads']} thread(s), budget {budget}: "
                     f"peak +{row['peak_extra_rss_mb']:.0f} MB = {row['ratio_to_pixels']} x one image's decoded pixels "
                     f"({row['decoded_mb_per_image']:.0f} MB); {row['budget_waits']} waits for the budget")
    return "\n".join(lines)
