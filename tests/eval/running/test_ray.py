"""``run --ray``: the same batches as Ray actors on a real local Ray, the driver the one writer;
every item exactly once, also after an actor is killed."""
from __future__ import annotations

import asyncio
import json

import pytest

ray = pytest.importorskip("ray")

from anomalyclaw.cli import main as cli_main  # noqa: E402
from anomalyclaw.eval.bench.throughput import copies  # noqa: E402
from anomalyclaw.eval.data.manifests import write_manifest  # noqa: E402
from anomalyclaw.eval.running.records import RECORDS_FILE, load_records  # noqa: E402
from anomalyclaw.eval.running.workers import RaySession, ShardedRunner, WorkerStartError  # noqa: E402
from anomalyclaw.graph.vlm import make_vlm  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (it takes 10-20 s to start here), started as ``run --ray``
    starts one: :class:`RaySession`, ``ray.init`` in its own thread."""
    if ray.is_initialized():
        ray.shutdown()
    session = RaySession(num_cpus=2)
    session.start()
    assert session.started and ray.is_initialized()
    yield ray
    session.close()
    assert not ray.is_initialized()


def test_a_session_refuses_an_address_where_nothing_answers_sync_and_on_a_loop(free_port):
    # The module's first test: no Ray is up yet (local_ray starts one for the tests below).
    if ray.is_initialized():
        ray.shutdown()
    session = RaySession(f"127.0.0.1:{free_port}")
    with pytest.raises(WorkerStartError, match=f"nothing answers at 127.0.0.1:{free_port}"):
        session.start()
    with pytest.raises(WorkerStartError, match=f"nothing answers at 127.0.0.1:{free_port}"):
        asyncio.run(RaySession(f"ray://127.0.0.1:{free_port}").astart())
    assert not session.started and not ray.is_initialized()


def test_a_session_leaves_a_ray_it_did_not_start_running(local_ray):
    session = RaySession()
    session.start()
    assert not session.started
    session.close()
    assert ray.is_initialized()


def test_ray_actors_judge_every_item_once_also_after_one_is_killed(local_ray, small_items, tmp_path, kill_mid_run):
    items = copies(small_items, 20)
    runner = ShardedRunner(make_vlm("offline"), workers=2, ray="", out_dir=tmp_path, progress=False, batch_size=2)
    records = tmp_path / RECORDS_FILE
    # The actor and every batch it holds are lost.
    summary, _ = kill_mid_run(runner, items, 2, lambda r: ray.kill(r.pool.actors[0]))
    ids = [json.loads(line)["item_id"] for line in records.read_bytes().split(b"\n")[:-1]]
    assert sorted(ids) == sorted(it.item_id for it in items), "an item was lost or written twice"
    assert summary.n_done == len(ids) and summary.n_errors == 0 and summary.fatal is None
    assert summary.workers["kind"] == "ray" and summary.workers["respawns"] >= 1
    assert ray.is_initialized()  # a Ray the caller started stays up


def test_run_ray_on_the_command_line_then_resume(local_ray, small_items, tmp_path, capsys):
    items = small_items[:6]
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    args = ["run", "--manifest", str(manifest), "--out", str(out), "--backend", "offline", "--no-progress",
            "--ray", "--workers", "2", "--json"]
    assert cli_main(args) == 0
    first = (out / RECORDS_FILE).read_bytes()
    assert sorted(r.item_id for r in load_records(out / RECORDS_FILE)) == sorted(it.item_id for it in items)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_items"] == len(items) and result["n_errors"] == 0
    assert cli_main(args + ["--resume"]) == 0  # everything done: nothing judged again
    assert (out / RECORDS_FILE).read_bytes() == first


def test_an_address_where_nothing_answers_is_refused_at_once(free_port):
    from anomalyclaw.eval.running.workers import _check_reachable

    port = free_port
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(WorkerStartError, match=f"--ray {address}: nothing answers at 127.0.0.1:{port}"):
            _check_reachable(address)
    _check_reachable("auto")  # left to Ray


def test_the_benchs_ray_row_runs_on_a_ray_it_did_not_start_and_leaves_it_up(local_ray, tmp_path):
    from anomalyclaw.eval.bench.throughput import BenchPlan, run_bench

    plan = BenchPlan(latencies_s=(), concurrencies=(), compare_sdk=(), tool_repeats=0, new_sets=0, demo=False,
                     n_test_per_domain=2, image_size=64, domains=("S1",), scale_latency_s=0.02,
                     scale_concurrencies=(2,), scale_modes=("ray 2",), scale_items_per_slot=2)
    rows = run_bench(plan, work_dir=tmp_path)["scale"]
    # The bare-client baseline on the same endpoint, then the Ray row.
    assert [(r["mode"], r["items"], r["errors"]) for r in rows] == [("no agent", 4, 0), ("ray 2", 4, 0)]
    assert rows[1]["requests_per_item"] == 3.0 and rows[1]["ratio"] > 0
    assert ray.is_initialized()
