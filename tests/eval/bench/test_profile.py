"""The CPU profiler behind ``anomalyclaw bench profile``: it charges each thread's CPU time to the
category of the code it runs, and a whole (tiny) profiled run adds up to the run's CPU."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from anomalyclaw.eval.bench.profile import CATEGORY_ORDER, CPUSampler, format_passes, format_profile, profile_run


def _spin(seconds: float, work) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        work()


def test_cpu_goes_to_the_category_of_the_code_that_spends_it():
    from anomalyclaw.experts.backbones import ClassicBackbone
    from anomalyclaw.imaging import encode_image

    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    backbone = ClassicBackbone(work_size=64)
    threads = [threading.Thread(target=_spin, args=(0.4, lambda: backbone.patch_features([image]))),
               threading.Thread(target=_spin, args=(0.4, lambda: encode_image(image, "JPEG")))]
    with CPUSampler(interval_s=0.002) as sampler:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    spent = sampler.seconds
    assert spent["experts"] > 0.25 and spent["image encode + base64"] > 0.25, dict(spent)
    assert sum(spent.values()) < 0.8 * 1.5  # CPU time, not wall time of idle threads
    assert set(spent) <= set(CATEGORY_ORDER)


def _burn_then_wait(rounds: int, burn_s: float, wait_s: float) -> None:
    idle = threading.Event()
    for _ in range(rounds):
        end = time.thread_time() + burn_s
        while time.thread_time() < end:
            pass
        idle.wait(wait_s)  # blocked: the sampler mostly finds the thread here


def test_cpu_spent_before_a_wait_goes_to_the_code_that_spent_it_not_to_the_wait():
    # A thread that computes 2 ms, then blocks 6 ms in threading.Event.wait, which these rules
    # call "event loop" (as the real ones call the selector's select "HTTP"): most samples find
    # it blocked there, with the CPU it spent since the last sample. Charged where the sampler
    # found it, most of its CPU went to the wait; it belongs to _burn_then_wait.
    def rules(filename: str, function: str) -> str | None:
        if function == "_burn_then_wait":
            return "tools"
        return "event loop" if filename == threading.__file__ else None

    worker = threading.Thread(target=_burn_then_wait, args=(60, 0.002, 0.006))
    with CPUSampler(interval_s=0.003, rules=rules) as sampler:
        worker.start()
        worker.join()
    spent = sampler.seconds
    total = sum(spent.values())
    assert total > 0.08, dict(spent)  # ~0.12 s of CPU, seen
    # What stays at a wait: the CPU of a thread never found running (here the joining one's).
    assert spent["tools"] > 0.95 * total and spent["event loop"] < 0.02 * total, dict(sampler.functions)


def _burn_then_block_in_a_call(rounds: int, burn_s: float, block_s: float) -> None:
    for _ in range(rounds):
        end = time.thread_time() + burn_s
        while time.thread_time() < end:
            pass
        _write_durably(block_s)


def _write_durably(block_s: float) -> None:
    time.sleep(block_s)  # a blocking system call that is no known wait, as os.fsync in a write


def test_a_thread_blocked_in_a_system_call_is_not_charged_the_cpu_it_spent_elsewhere():
    # 3 ms of CPU, then 12 ms asleep inside _write_durably (as the records' writer sits in fsync):
    # most samples find the thread there, "running" as far as its frame says, but its clock has
    # not moved. Spread in proportion to where it was found, ~80% of the CPU went to the write.
    def rules(filename: str, function: str) -> str | None:
        return {"_burn_then_block_in_a_call": "tools", "_write_durably": "records"}.get(function)

    worker = threading.Thread(target=_burn_then_block_in_a_call, args=(30, 0.003, 0.012))
    with CPUSampler(interval_s=0.003, rules=rules) as sampler:
        worker.start()
        worker.join()
    spent = sampler.seconds
    total = spent["tools"] + spent["records"]
    assert total > 0.06, dict(spent)  # ~0.09 s of CPU, seen
    assert spent["tools"] > 0.85 * total, dict(sampler.functions)


def test_a_profiled_run_adds_up(tmp_path, monkeypatch, capsys):
    import tqdm.auto

    from anomalyclaw.threads import compute_slots, intra_op_threads

    bars = []

    class Counted(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Counted)
    before = compute_slots()
    result = profile_run(n_items=6, concurrency=3, latency_s=0.0, image_size=64, n_test_per_domain=2,
                         work_dir=tmp_path, interval_s=0.002, compute_slots=before + 5)
    assert result["compute_slots"] == before + 5 and compute_slots() == before  # the pass's, then back
    # One intra-op thread, as a run sets them (with the libraries' own, their pools' threads are
    # CPU no Python thread's clock holds: "unattributed").
    assert result["intra_op_threads"] == intra_op_threads() == 1 and "1 intra-op thread;" in format_profile(result)
    assert result["items"] == 6 and result["errors"] == 0 and result["requests_per_item"] == 3.0
    parts = result["by_category"]
    # The big categories always show; a small one (LangGraph, ~1 ms per item) may miss every sample
    # of a 6-item run: its rule is checked on a frame below.
    assert parts["tools"] > 0 and parts["experts"] > 0 and parts["HTTP"] > 0
    total = sum(parts.values()) + result["profiler_ms_per_item"]
    assert abs(total - result["cpu_ms_per_item"]) < 0.2  # rounding only: the rest is "unattributed"
    # What no thread's clock accounts for is small, and never negative beyond rounding.
    assert -0.2 < parts["unattributed"] < 0.25 * result["cpu_ms_per_item"]
    assert "total (process CPU)" in format_profile(result)
    # The kernel's part of that CPU, and the page faults behind most of it, are reported.
    assert 0 <= result["system_ms_per_item"] < result["cpu_ms_per_item"] and result["page_faults_per_item"] > 0
    assert f"({result['page_faults_per_item']} page faults per item" in format_profile(result)
    # The compute threads' stages, each by its own thread clock: the item's preparation, its
    # tool call, the experts and the maps, within the process's CPU.
    stages = result["stages"]
    assert {"Runner.judge.prepare", "tool side_by_side_compare", "_expert_results", "localize_state",
            "Runner.judge.finish"} <= set(stages)
    # One hop each: the fusion's two experts go to one compute thread together.
    assert stages["Runner.judge.prepare"]["calls_per_item"] == stages["_expert_results"]["calls_per_item"] == 1.0
    assert 0 < sum(v["ms_per_item"] for v in stages.values()) < result["cpu_ms_per_item"]
    assert "compute-thread stages" in format_profile(result)
    # The measured pass draws the bar a command-line run draws (6 items), and none of it shows.
    assert [bar.total for bar in bars] == [6] and bars[0].n == 6
    assert "anomalyclaw" not in capsys.readouterr().err
    assert result["transport"] == "aiohttp" and "langchain on aiohttp" in format_profile(result)
    again = dict(result, cpu_ms_per_item=result["cpu_ms_per_item"] + 2.0, compute_slots=before)
    httpx = dict(result, transport="httpx")
    own = dict(result, intra_op_threads=None)
    lines = format_passes([result, again, result, httpx, own]).splitlines()
    assert lines[1].split(":")[0].split() == ["langchain", "aiohttp", str(before + 5), "compute", "slots,", "1",
                                              "intra-op", "thread"]
    assert f"(median {result['cpu_ms_per_item']:.1f})" in lines[1] and len(lines) == 5
    assert f"loop {result['loop_cpu_ms_per_item']:.1f}, {result['loop_cpu_ms_per_item']:.1f} (median" in lines[1]
    assert lines[3].split(":")[0].split()[:2] == ["langchain", "httpx"]
    assert "the libraries' own intra-op threads:" in lines[4]


def test_library_frames_go_to_their_category():
    import langgraph.pregel.main as pregel

    from anomalyclaw.eval.bench.profile import _Rules
    from anomalyclaw.experts import patchknn

    rules = _Rules()
    assert rules(pregel.__file__, "astream") == "LangGraph"
    assert rules(patchknn.__file__, "nearest_distances") == "experts"
    assert rules(np.__file__, "mean") is None  # NumPy decides nothing: its caller does
    import aiohttp.client
    import httpcore2
    from openai._vendor.httpx_aiohttp import transport

    # Both transports' frames are HTTP, the SDK's bridge to aiohttp included.
    assert rules(aiohttp.client.__file__, "_request") == rules(httpcore2.__file__, "x") == "HTTP"
    assert rules(transport.__file__, "handle_async_request") == "HTTP"


def test_the_command_line_takes_compute_slots_to_compare_and_rounds():
    from anomalyclaw.cli import build_parser

    args = build_parser().parse_args(["bench", "profile", "--compute-slots", "3,64", "--rounds", "2"])
    assert args.compute_slots == [3, 64] and args.rounds == 2
    assert args.intra_op_threads == [1]  # as a run sets them
    assert build_parser().parse_args(["bench", "profile", "--intra-op-threads", "1,libs"]).intra_op_threads == [1, None]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "profile", "--intra-op-threads", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "profile", "--compute-slots", "3,0"])
    assert build_parser().parse_args(["bench", "profile"]).transport == "aiohttp"
    assert build_parser().parse_args(["bench", "profile", "--transport", "aiohttp,httpx"]).transport == "aiohttp,httpx"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "profile", "--transport", "aiohttp,curl"])


def test_the_gc_clock_times_each_generation_of_collection():
    import gc

    from anomalyclaw.eval.bench.profile import GCClock

    with GCClock() as clock:
        junk = []
        for _ in range(2000):  # cycles: only the collector frees them
            a = []
            a.append(a)
            junk.append(a)
        del junk, a
        gc.collect(0)
        gc.collect(2)
    assert clock.passes[0] >= 1 and clock.passes[2] >= 1
    assert clock.seconds[2] > 0 and all(s >= 0 for s in clock.seconds)
    assert clock._callback not in gc.callbacks
