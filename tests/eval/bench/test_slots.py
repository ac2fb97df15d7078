"""``anomalyclaw bench slots``: runner passes at each compute-slot setting, alternating, each
under its own setting, with the context switches per item beside the CPU."""
from __future__ import annotations

import sys

from anomalyclaw import threads
from anomalyclaw.eval.bench import throughput
from anomalyclaw.eval.bench.slots import bench_slots, format_slots


def test_passes_alternate_each_under_its_own_setting_and_the_default_comes_back(monkeypatch, tmp_path):
    seen, run = [], throughput._run

    def spying(items, vlm, out_dir, *args, **kwargs):
        seen.append((out_dir.name, threads.compute_slots()))
        return run(items, vlm, out_dir, *args, **kwargs)

    monkeypatch.setattr(throughput, "_run", spying)
    before = threads.compute_slots()
    result = bench_slots((1, 2), rounds=2, n_items=6, concurrency=4, latency_s=0.0, image_size=64,
                         work_dir=tmp_path)
    assert threads.compute_slots() == before
    assert seen[1:] == [("slots1-0", 1), ("slots2-0", 2), ("slots1-1", 1), ("slots2-1", 2)]  # after the warm-up
    passes = result["passes"]
    assert [(p["slots"], p["round"]) for p in passes] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert all(p["items"] == 6 and p["errors"] == 0 and p["cpu_ms_per_item"] > 0 for p in passes)
    if sys.platform != "win32":
        assert all(p["switches_per_item"] >= 1 for p in passes)  # at least the item's thread hops
        assert set(result["medians"][1]) == {"cpu_ms_per_item", "items_per_s", "loop_cpu_ms_per_item",
                                             "switches_per_item"}
    table = format_slots(result)
    assert "median, 1 slot(s): cpu ms per item" in table and len(table.splitlines()) == 2 + 4 + 2
