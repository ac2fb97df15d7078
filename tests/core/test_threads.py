"""Compute slots: at most N threads compute at once in a process (re-entrant per thread), and the
runner's CPU work goes through them."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from anomalyclaw import threads


@pytest.fixture
def slots():
    before = threads.compute_slots()
    yield threads.set_compute_slots
    threads.set_compute_slots(before)


def test_at_most_n_threads_compute_at_once_and_a_nested_slot_is_the_same_slot(slots):
    slots(2)
    inside = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        with threads.compute_slot():
            with threads.compute_slot():  # a tool asking an expert: no second slot, no deadlock
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.02)
                with lock:
                    inside -= 1

    workers = [threading.Thread(target=work) for _ in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=10)
    assert peak == 2 and inside == 0


def test_a_coroutine_runs_cpu_work_in_a_slot_off_the_loop(slots):
    slots(1)
    loop_thread = threading.get_ident()
    seen: list[tuple[int, int]] = []

    def work(x: int) -> int:
        seen.append((threading.get_ident(), threads._inside.depth))
        return x * 2

    async def main() -> list[int]:
        return await asyncio.gather(*(threads.to_compute_thread(work, k) for k in range(4)))

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert all(ident != loop_thread and depth == 1 for ident, depth in seen)


def test_slot_counts_are_checked_and_the_default_is_one_per_core(slots, monkeypatch):
    with pytest.raises(ValueError, match="compute slots must be >= 1, got 0"):
        slots(0)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.default_compute_slots() == 2 and threads.default_compute_slots(1) == 1
    assert threads.default_compute_slots(0) == 1  # a worker's share of a small machine: still one core


def test_workers_get_their_share_of_the_cores_and_ray_actors_their_one_cpu(monkeypatch, tmp_path):
    from anomalyclaw.eval.running.workers import ShardedRunner
    from anomalyclaw.graph.vlm import make_vlm

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    processes = ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path, progress=False)
    assert [s.compute_slots for s in processes.specs()] == [4, 4]
    actors = ShardedRunner(make_vlm("offline"), workers=2, ray="", out_dir=tmp_path, progress=False)
    assert [s.compute_slots for s in actors.specs()] == [1, 1]


def test_frozen_heap_keeps_what_was_alive_out_of_full_collections_then_puts_it_back():
    import gc

    from anomalyclaw.threads import frozen_heap

    assert gc.get_freeze_count() == 0
    kept = [[] for _ in range(1000)]
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        with frozen_heap():  # nested (a run inside a run): frozen once, thawed by the outer block
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
        new = [[] for _ in range(1000)]  # objects of the run itself are collected as usual
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    del kept, new


def test_a_run_freezes_the_heap_while_it_runs_and_thaws_it_after(tmp_path):
    import gc

    from anomalyclaw.config import AgentConfig
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.eval.running.runner import Runner, run_sync
    from anomalyclaw.graph.vlm import make_vlm

    items = load_manifest(generate_benchmark(tmp_path / "synth", seed=0, n_test_per_domain=2, n_calibration=0,
                                             n_dev=0, size=64, domains=["S1"]), split="test")[:1]
    seen = []

    class Watching(Runner):
        async def judge(self, item):
            seen.append((gc.get_freeze_count(), gc.get_threshold()))
            return await super().judge(item)

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        summary = run_sync(Watching(make_vlm("offline"), out_dir=tmp_path / "out", config=AgentConfig()), items)
        assert summary.n_done == 1 and seen and seen[0][0] > 0
        # The young generation waits for more allocations inside the run, and is as it was after.
        assert seen[0][1] == (threads.RUN_YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_a_stage_clock_charges_each_outermost_slot_its_threads_cpu(slots):
    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def both():
        with threads.compute_slot("outer"):
            spin(0.05)
            with threads.compute_slot("inner"):  # inside a slot: charged to the outer one
                spin(0.05)

    spin(0.01)  # outside any slot: charged to nothing
    with threads.clock_stages() as clock:
        both()
        asyncio.run(threads.to_compute_thread(spin, 0.03))
    with threads.compute_slot("after"):  # no clock installed
        spin(0.001)
    label = "test_a_stage_clock_charges_each_outermost_slot_its_threads_cpu.spin"  # the qualname, "<locals>." left out
    assert set(clock.seconds) == {"outer", label} and clock.calls == {"outer": 1, label: 1}
    assert 0.1 <= clock.seconds["outer"] < 0.2 and 0.03 <= clock.seconds[label] < 0.1


def test_a_run_computes_with_one_intra_op_thread_in_opencv_and_torch_then_restores_them(tmp_path):
    import cv2
    import torch

    from anomalyclaw.config import AgentConfig
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.eval.running.runner import Runner, run_sync
    from anomalyclaw.graph.vlm import make_vlm

    items = load_manifest(generate_benchmark(tmp_path / "synth", seed=0, n_test_per_domain=2, n_calibration=0,
                                             n_dev=0, size=64, domains=["S1"]), split="test")[:1]
    seen = []

    class Watching(Runner):
        async def judge(self, item):
            seen.append((cv2.getNumThreads(), torch.get_num_threads()))
            return await super().judge(item)

    cv2_before, torch_before = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(2)
    torch.set_num_threads(2)
    try:
        summary = run_sync(Watching(make_vlm("offline"), out_dir=tmp_path / "out", config=AgentConfig()), items)
        assert summary.n_done == 1 and seen == [(1, 1)]
        assert (cv2.getNumThreads(), torch.get_num_threads()) == (2, 2)
        # None: the libraries keep their own (what `bench profile --intra-op-threads libs` compares).
        with threads.limit_intra_op_threads(None):
            run_sync(Watching(make_vlm("offline"), out_dir=tmp_path / "own", config=AgentConfig()), items)
        assert seen[-1] == (2, 2) and threads.intra_op_threads() == 1
        with pytest.raises(ValueError, match="intra-op threads"):
            with threads.limit_intra_op_threads(0):
                pass
    finally:
        cv2.setNumThreads(cv2_before)
        torch.set_num_threads(torch_before)
