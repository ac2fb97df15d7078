"""The start of a ``--workers`` run as a user sees it (``anomalyclaw bench start``): seconds from
launching ``anomalyclaw run --workers N`` to its first record, to its last, and to its exit,
against the fake endpoint in its own process, with the workers' fork server started first (as
``run`` does) and, in the same bench, started by the first worker instead (as before: the child
process then replaces :func:`~anomalyclaw.eval.running.forkserver.start_worker_server` with a no-op
before it runs the command line). Rounds alternate the two, so that the machine's drift falls on
both.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from anomalyclaw.eval.bench.throughput import copies, fake_endpoint_process, finish_times

#: The two ways the fork server starts, and the child's prelude for each.
VARIANTS = {
    "first thing": "",
    "at the first worker": ("import anomalyclaw.eval.running.forkserver as forkserver\n"
                            "forkserver.start_worker_server = lambda **kw: False\n"),
}
_CHILD = "import sys\nfrom anomalyclaw.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def time_run(manifest: Path, url: str, out: Path, *, prelude: str = "", workers: int = 2,
             concurrency: int = 128) -> dict[str, Any]:
    """One ``anomalyclaw run --workers`` in a child process: seconds from its launch to its
    first record, its last record and its exit; items per second over the whole."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", "--manifest", str(manifest), "--split", "test", "--out", str(out), "--base-url", url,
            "--model", "fake-vlm", "--concurrency", str(concurrency), "--workers", str(workers), "--no-progress"]
    err = out.with_name(out.name + ".stderr")
    with open(err, "wb") as fh:  # a file, not a pipe: the fork server holds it open after the run exits
        launched = time.time()
        proc = subprocess.run([sys.executable, "-c", prelude + _CHILD, *argv], stdout=subprocess.DEVNULL, stderr=fh)
        exited = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"anomalyclaw run exited {proc.returncode}: {err.read_text(errors='replace')[-1500:]}")
    finished = finish_times(out)
    return {"items": len(finished), "first_record_s": round(finished[0] - launched, 2),
            "last_record_s": round(finished[-1] - launched, 2), "exit_s": round(exited, 2),
            "items_per_s": round(len(finished) / exited, 2)}


def bench_start(n_items: int = 1418, *, rounds: int = 2, workers: int = 2, concurrency: int = 128,
                latency_s: float = 1.0, image_size: int = 512, variants: Sequence[str] = tuple(VARIANTS),
                work_dir: str | Path | None = None) -> dict[str, Any]:
    """``rounds`` runs of each variant, alternating, on ``n_items`` copies of the synthetic
    benchmark's test items; the rows and each variant's medians."""
    from anomalyclaw.eval.data.manifests import load_manifest, write_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        synth = generate_benchmark(work / "synth", seed=0, n_test_per_domain=4, n_calibration=0, n_dev=0,
                                   size=image_size)
        manifest = write_manifest(copies(load_manifest(synth, split="test"), n_items), work / "manifest.json")
        rows = []
        with fake_endpoint_process(latency_s) as url:
            for k in range(rounds):
                for name in variants:
                    row = time_run(manifest, url, work / "run", prelude=VARIANTS[name], workers=workers,
                                   concurrency=concurrency)
                    rows.append({"fork server": name, "round": k + 1, **row})
    medians = {name: {key: round(statistics.median(r[key] for r in rows if r["fork server"] == name), 2)
                      for key in ("first_record_s", "last_record_s", "exit_s", "items_per_s")}
               for name in variants}
    return {"items": n_items, "workers": workers, "concurrency": concurrency, "latency_s": latency_s,
            "rows": rows, "medians": medians}


def format_start(result: dict[str, Any]) -> str:
    lines = [f"anomalyclaw run --workers {result['workers']} --concurrency {result['concurrency']}, "
             f"{result['items']} items, fake endpoint at {result['latency_s']:g} s (seconds from launch)",
             f"{'fork server started':<22} {'round':>5} {'first record':>12} {'last record':>11} {'exit':>7} "
             f"{'items/s':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['fork server']:<22} {r['round']:>5} {r['first_record_s']:>12.2f} {r['last_record_s']:>11.2f} "
                     f"{r['exit_s']:>7.2f} {r['items_per_s']:>8.2f}")
    for name, m in result["medians"].items():
        lines.append(f"{name + ' (median)':<28} {m['first_record_s']:>12.2f} {m['last_record_s']:>11.2f} "
                     f"{m['exit_s']:>7.2f} {m['items_per_s']:>8.2f}")
    return "\n".join(lines)
