"""The speed benchmark's smallest configuration, end to end, so that it cannot rot (no timing is
asserted: this machine's speed is not the test's business)."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.cli import build_parser, cmd_bench
from anomalyclaw.eval.bench.throughput import BenchPlan, copies, format_bench, reference_reuse, run_bench


def test_smallest_bench_measures_every_section(tmp_path):
    plan = BenchPlan(latencies_s=(0.02,), concurrencies=(2,), items_per_slot=2, min_items=2, image_size=64,
                     n_test_per_domain=2, domains=("S1", "S3"), compare_sdk=((0.02, 2),), tool_repeats=1,
                     new_sets=4, demo=False, scale_concurrencies=())  # (scale rows: their own test)
    result = run_bench(plan, work_dir=tmp_path)
    json.dumps(result)  # the --json and --out forms

    rows = result["throughput"]
    assert [(r["client"], r["concurrency"], r["items"]) for r in rows] == [("langchain", 2, 4), ("sdk", 2, 4)]
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_item"] == 3.0  # direct, propose, refute
        assert row["ideal_items_per_s"] == round(row["concurrency"] / (3 * 0.02), 3) and row["ratio"] > 0
        assert row["cpu_ms_per_item"] > 0 and row["request_kb_per_item"] > 0
        assert 0 < row["loop_busy"] <= 1.0

    by_policy = {r["policy"]: r for r in result["request_bytes"]}
    once, every, naive = (by_policy[k] for k in ("once (default)", "all", "naive: all, PNG, full size"))
    assert once["errors"] == every["errors"] == 0
    # The refute turn resends the first message's images under "all", not under "once".
    assert once["images_per_item"] < every["images_per_item"] == naive["images_per_item"]
    assert once["request_kb_per_item"] < every["request_kb_per_item"] < naive["request_kb_per_item"]
    assert every["bytes_vs_once"] > 1.0

    experts = result["experts"]
    assert experts["items"] == 4 and experts["sets_fitted"] >= 1 and experts["score_ms_per_item"] > 0
    assert experts["pool"]["misses"] == experts["sets_fitted"]
    assert experts["fit_ms_per_set_without_image_cache"] > 0 and experts["fit_speedup_from_image_cache"] > 0
    pool = experts["pool"]
    # each distinct reference image encoded at most once over the pass
    assert 1 <= pool["image_misses"] <= experts["unique_reference_images"]
    assert pool["image_hits"] + pool["image_misses"] <= experts["reference_slots"]
    knn = experts["knn"]  # tiled and one-block search of one query against its references' bank
    assert knn["max_difference"] < 1e-4 and knn["tiled_ms"] > 0 and knn["one_block_ms"] > 0
    assert knn["bank_patches"] % knn["query_patches"] == 0 and knn["bank_patches"] > knn["query_patches"]
    warm = result["warmup"]
    assert warm["items"] == 4 and warm["pool"]["misses"] >= 1
    start = result["run_start"]  # a run's start around no items: made anew, then with the shared setup
    assert start["rounds"] == 5 and all(len(v) == 5 for v in start["cpu_ms"].values())
    assert 0 < start["median_ms"]["shared"] < start["median_ms"]["made anew"] and start["ratio"] > 1
    assert {r["tool"] for r in result["tools"]} >= {"side_by_side_compare", "region_zoom"}

    new = result["new_sets"]
    assert new["sets"] == 4 and set(new["variants"]) == {"before", "after"}
    after, before = new["variants"]["after"], new["variants"]["before"]
    # The current pool reuses images and image pairs across the four sets; the baseline does not.
    assert after["pool"]["image_hits"] > 0 and after["pool"]["held_out_hits"] > 0
    assert before["pool"]["image_hits"] == 0 and before["pool"]["held_out_hits"] == 0
    assert after["anomaly_vfm"]["fit_cpu_ms_per_set"] > 0 and new["speedup"]["anomaly_vfm"] > 0

    text = format_bench(result)
    for heading in ("Runner throughput", "Request size per item", "Expert anomaly_vfm", "Tool latency",
                    "New reference sets", "Nearest-neighbour search", "a run's start and end around no items"):
        assert heading in text


def test_copies_get_new_ids_and_keep_everything_else(small_items):
    made = copies(small_items[:3], 7)
    assert len({c.item_id for c in made}) == 7
    assert made[4].item_id == f"{small_items[1].item_id}~1"
    assert made[4].query_path == small_items[1].query_path and made[4].ref_paths == small_items[1].ref_paths


def test_reference_reuse_counts_sets_and_images(tmp_path):
    rows = [{"split": "test", "ref_paths": ["a", "b"]}, {"split": "test", "ref_paths": ["a", "b"]},
            {"split": "test", "ref_paths": ["b", "c"]}, {"split": "dev", "ref_paths": ["z"]}]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(rows))
    reuse = reference_reuse(path)
    assert reuse["items"] == 3 and reuse["unique_sets"] == 2 and reuse["unique_images"] == 3
    assert reuse["set_hit_rate"] == round(1 - 2 / 3, 3) and reuse["image_hit_rate"] == 0.5


def test_bench_command_is_wired():
    args = build_parser().parse_args(["bench", "--quick", "--json", "--out", "bench.json"])
    assert args.handler is cmd_bench and args.quick and args.json and args.out == "bench.json"


def test_scale_rows_measure_one_process_and_workers(tmp_path):
    """The scale rows' smallest form (Ray's rows are left to the Ray tests' module: one Ray start
    per module)."""
    from anomalyclaw.eval.bench.throughput import BenchPlan, format_scale

    plan = BenchPlan(latencies_s=(), concurrencies=(), compare_sdk=(), tool_repeats=0, new_sets=0, demo=False,
                     n_test_per_domain=2, image_size=64, domains=("S1", "S3"), scale_latency_s=0.02,
                     scale_concurrencies=(2, 3), scale_modes=("1 process", "workers 2"), scale_items_per_slot=3,
                     scale_items=7, scale_transports=("aiohttp", "httpx"), scale_loops=("asyncio", "uvloop"))
    result = run_bench(plan, work_dir=tmp_path)
    json.dumps(result)
    assert "run_start" not in result  # the scale plan measures its rows alone
    rows = result["scale"]
    # Each concurrency's rows follow a bare client on the same endpoint, as many requests, no agent.
    bare = [r for r in rows if r["mode"] == "no agent"]
    assert [(r["concurrency"], r["items"], r["errors"]) for r in bare] == [(2, 7.0, 0), (3, 7.0, 0)]
    for row in bare:
        assert row["ideal_items_per_s"] == round(row["concurrency"] / (3 * 0.02), 3) and 0 < row["ratio"] <= 1.05
        # One request deep: 21 requests over 2 slots, 11 rounds for 10.5; over 3, exactly 7.
        assert row["ceiling"] == {2: 0.955, 3: 1.0}[row["concurrency"]] and row["first_record_s"] is None
    assert "no agent" in format_scale(rows) and "no agent = the same endpoint" in format_scale(rows)
    rows = [r for r in rows if r["mode"] != "no agent"]
    # Each mode's row once per transport and loop, a loop's row next to the other's.
    assert [(r["mode"], r["concurrency"], r["transport"], r["loop"], r["items"]) for r in rows] == [
        (mode, conc, transport, loop, 7) for conc in (2, 3) for mode in ("1 process", "workers 2")
        for transport in ("aiohttp", "httpx") for loop in ("asyncio", "uvloop")]
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_item"] == 3.0
        assert row["ideal_items_per_s"] == round(row["concurrency"] / (3 * 0.02), 3) and row["ratio"] > 0
        assert row["cpu_ms_per_item"] > 0
        # Its first record came after the item's three requests, and within the row's time; 7
        # items over 2 slots take 4 rounds for 3.5 of work, over 3 slots 3 for 2.33.
        assert 3 * 0.02 <= row["first_record_s"] <= row["elapsed_s"]
        assert row["ceiling"] == {2: 0.875, 3: 0.778}[row["concurrency"]]
        # The workers fit the sets they meet (S1 and S3, 2 test items each: 4 sets); one process
        # uses the warm-up's pool.
        assert (1 <= row["sets_fitted"] <= 8) if row["mode"] == "workers 2" else row["sets_fitted"] == 0
    assert "Past one process" in format_bench(result) and "workers 2" in format_scale(rows)
    assert [line.split()[-14:-12] for line in format_scale(rows).splitlines()[2:6]] == [
        ["aiohttp", "asyncio"], ["aiohttp", "uvloop"], ["httpx", "asyncio"], ["httpx", "uvloop"]]
    assert format_scale(result["scale"]).splitlines()[2].split()[2:4] == ["no", "agent"]
    args = build_parser().parse_args(["bench", "scale", "--json"])
    assert args.handler is cmd_bench and args.bench_command == "scale"


def test_bench_scale_flags_choose_the_rows():
    from anomalyclaw.eval.bench.throughput import scale_plan

    args = build_parser().parse_args(["bench", "scale", "--concurrency", "32", "--modes", "process,ray",
                                      "--items", "1418"])
    plan = scale_plan(args.concurrency, args.modes.split(","), args.items)
    assert (plan.scale_concurrencies, plan.scale_modes, plan.scale_items) == ((32,), ("1 process", "ray 2"), 1418)
    assert plan.scale_transports == ("aiohttp",) and args.transport == "aiohttp"
    args = build_parser().parse_args(["bench", "scale", "--transport", "aiohttp,httpx"])
    assert scale_plan(transports=args.transport.split(",")).scale_transports == ("aiohttp", "httpx")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "scale", "--transport", "h2"])
    args = build_parser().parse_args(["bench", "scale", "--loop", "asyncio,uvloop"])
    assert scale_plan(loops=args.loop.split(",")).scale_loops == ("asyncio", "uvloop")
    assert scale_plan().scale_loops == ("auto",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "scale", "--loop", "trio"])
    default = scale_plan()
    assert (default.scale_concurrencies, default.scale_modes, default.scale_items) == (
        (32, 128, 256), ("1 process", "workers 2", "ray 2"), None)
    assert default.latencies_s == () and default.tool_repeats == 0 and not default.demo
    with pytest.raises(ValueError, match="--modes: unknown threads"):
        scale_plan(modes=["threads"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "scale", "--items", "0"])


def test_slot_ceiling_counts_the_rounds_a_slot_holds_items_for():
    from anomalyclaw.eval.bench.throughput import slot_ceiling

    # A whole CrossDomainVAD-12 test split: 1,418 = 11 x 128 + 10, so 12 rounds of one item's
    # requests at 128; 45 rounds for 44.3 at 32; one request deep, 4,254 requests in 34 rounds.
    assert round(slot_ceiling(1418, 128), 3) == 0.923
    assert round(slot_ceiling(1418, 32), 3) == 0.985
    assert round(slot_ceiling(1418, 128, 3, one_deep=True), 3) == 0.977
    assert slot_ceiling(512, 128) == 1.0 and slot_ceiling(100, 200) == 0.5
