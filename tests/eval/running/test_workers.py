"""``run --workers N``: items judged in worker processes, the parent the one writer of the records;
every item exactly once, also after a worker or the parent is SIGKILLed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomalyclaw.cli import main as cli_main
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.eval.bench.throughput import copies
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE, Record, load_records
from anomalyclaw.eval.running.runner import Runner, run_sync
from anomalyclaw.eval.running.workers import ShardedRunner, WorkerLost
from anomalyclaw.graph.vlm import make_vlm

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["item_id"] for line in path.read_bytes().split(b"\n")[:-1]]


def _summary(out: Path) -> dict:
    runs = sorted(out.glob("run_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text())["summary"]


def test_two_workers_judge_every_item_once_as_one_process_does(small_items, tmp_path):
    items = small_items[:6]
    one = run_sync(Runner(make_vlm("offline"), out_dir=tmp_path / "one", progress=False), items)
    runner = ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path / "two", progress=False, batch_size=1)
    summary = run_sync(runner, items)
    records = load_records(tmp_path / "two" / RECORDS_FILE)
    assert sorted(r.item_id for r in records) == sorted(it.item_id for it in items)  # each exactly once
    expected = {r.item_id: r.anomaly_score for r in load_records(tmp_path / "one" / RECORDS_FILE)}
    assert {r.item_id: r.anomaly_score for r in records} == pytest.approx(expected)
    # The summary covers both workers and matches the records on disk.
    assert summary.n_done == len(records) == one.n_done
    assert summary.n_errors == sum(1 for r in records if r.error) == 0
    assert summary.requests == sum(r.usage["requests"] for r in records) == one.requests
    assert summary.workers["kind"] == "processes" and summary.workers["n"] == 2
    assert summary.workers["cpu_s"] > 0
    assert summary.cache["experts"]["sets"] >= 1  # the workers' expert pools, added up
    assert {r.run_id for r in records} == {runner.run_id}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_worker_processes_run_on_the_parents_kind_of_event_loop(small_items, tmp_path, loop):
    pytest.importorskip("uvloop")
    runner = ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path, progress=False, batch_size=1)
    summary = run_sync(runner, small_items[:4], loop=loop)
    assert summary.n_done == 4 and summary.workers["event_loops"] == [loop]
    assert json.loads(next(tmp_path.glob("run_*.json")).read_text())["event_loop"] == loop


def test_each_worker_warms_about_its_own_share_of_the_reference_sets(small_items, tmp_path):
    # 14 items, each with its own reference set, 4 copies each in manifest order (as bench scale
    # runs them): handing every batch to whichever worker was free, both workers fitted all 14
    # sets (28 fits); a shard per worker, each category's items together, fits each set about
    # once (a category cut by the shards' boundary, or a steal at the end, in both).
    items = copies(small_items, 4 * len(small_items))
    summary = run_sync(ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path / "run", progress=False), items)
    assert summary.n_done == len(items) and summary.n_errors == 0
    assert len({r.item_id for r in load_records(tmp_path / "run" / RECORDS_FILE)}) == len(items)
    n_sets = len({tuple(it.ref_paths) for it in small_items})
    assert n_sets == len(small_items)
    assert summary.cache["experts"]["sets"] <= n_sets + 4, (summary.cache["experts"], summary.workers)


def test_shards_hand_out_every_batch_once_a_worker_its_own_first_then_the_fullest_back():
    from anomalyclaw.eval.running.workers import Shards

    batches = [[f"b{k}-{j}" for j in range(3)] for k in range(7)] + [["rest-0"]]
    shards = Shards(batches, 2)
    assert [len(s) for s in shards.shards] == [4, 3] and shards.rest == [["rest-0"]]
    # Worker 1 takes its shard (b4..b6) front to back, then steals from the back of worker 0's.
    assert [shards.take(1, 3)[0] for _ in range(3)] == ["b4-0", "b5-0", "b6-0"]
    assert shards.take(1, 3)[0] == "b3-0" and shards.steals == 1
    assert shards.take(0, 1) == ["rest-0"]  # the one shorter batch, for the job of its length
    assert [shards.take(0, 3)[0] for _ in range(3)] == ["b0-0", "b1-0", "b2-0"]
    assert not any(shards.shards) and shards.steals == 1
    # More workers than full batches: one shard per batch; a worker without one steals.
    few = Shards([["a"], ["b"]], 4)
    assert len(few.shards) == 2 and few.take(3, 1) in (["a"], ["b"])


def test_worker_batches_keep_each_category_together_in_first_seen_order(small_items):
    from anomalyclaw.eval.running.workers import grouped

    mixed = copies(small_items, 3 * len(small_items))
    order = grouped(mixed)
    assert sorted(it.item_id for it in order) == sorted(it.item_id for it in mixed)
    keys = [(it.domain, it.category) for it in order]
    changes = sum(1 for a, b in zip(keys, keys[1:]) if a != b)
    assert changes == len(set(keys)) - 1  # each group contiguous
    firsts = list(dict.fromkeys((it.domain, it.category) for it in mixed))
    assert list(dict.fromkeys(keys)) == firsts


def test_sigkill_of_a_worker_mid_run_redoes_its_items(small_items, tmp_path, caplog, kill_mid_run):
    items = copies(small_items, 24)
    runner = ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path, progress=False, batch_size=2)
    records = tmp_path / RECORDS_FILE

    def kill(runner):
        victim = runner.pool.procs[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        return victim

    summary, victim = kill_mid_run(runner, items, 3, kill)
    ids = _ids(records)
    assert sorted(ids) == sorted(it.item_id for it in items), "an item was lost or written twice"
    assert summary.n_done == len(ids) and summary.n_errors == 0 and summary.fatal is None
    assert not victim.alive and victim.exitcode == -signal.SIGKILL
    assert "died" in caplog.text


def test_an_item_that_kills_its_worker_gets_an_error_record_and_the_rest_are_redone(small_items, tmp_path):
    """The redo rule, on a pool double: after a death the unfinished items go one per batch; an
    item whose worker dies twice while judging it alone is recorded as an error, once."""
    items = small_items[:5]
    poison = items[2].item_id
    deaths = {"batch": 0}

    class Pool:
        kind, respawns = "double", 0

        async def acquire(self):
            return 0

        def release(self, index):
            pass

        async def judge(self, index, batch):
            for it in batch:
                if it.item_id == poison or (len(batch) > 1 and deaths["batch"] == 0 and it is batch[-1]):
                    deaths["batch"] += len(batch) > 1
                    raise WorkerLost("worker process 0 died (exit status -9)")
                yield Record(item_id=it.item_id, anomaly_score=0.5)

    runner = ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path, progress=False)
    written: list[Record] = []

    async def emit(record):
        written.append(record)

    asyncio.run(runner._judge_on_pool(Pool(), list(items), emit, singles=False))
    assert sorted(r.item_id for r in written) == sorted(it.item_id for it in items)
    bad = [r for r in written if r.error]
    assert [r.item_id for r in bad] == [poison] and "died" in bad[0].error and "alone, 2 times" in bad[0].error


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out",
                             str(out), "--backend", "offline", "--no-progress", "--workers", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc: subprocess.Popen, records: Path, n: int, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (records.exists() and records.read_bytes().count(b"\n") >= n):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {n} records: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {n} records within {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_of_the_parent_then_resume_loses_and_duplicates_nothing(small_items, tmp_path, capsys):
    items = copies(small_items, 28)
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    records = out / RECORDS_FILE
    proc = _start(manifest, out)
    _wait_for_lines(proc, records, 4)
    workers = _descendants(proc.pid)
    assert workers, "no worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kept = records.read_bytes().split(b"\n")[:-1]
    deadline = time.monotonic() + 60  # the workers see their pipe close and exit
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "workers outlived their parent"
    code = cli_main(["run", "--manifest", str(manifest), "--out", str(out), "--backend", "offline",
                     "--no-progress", "--resume", "--workers", "2", "--json"])
    assert code == 0
    final = records.read_bytes()
    assert final.split(b"\n")[: len(kept)] == kept  # nothing finished was lost or rewritten
    assert sorted(_ids(records)) == sorted(it.item_id for it in items)  # each exactly once
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_items"] == len(items)


def test_sigterm_stops_the_workers_run_with_its_summary(small_items, tmp_path):
    items = copies(small_items, 28)
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    proc = _start(manifest, out)
    _wait_for_lines(proc, out / RECORDS_FILE, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished before the signal landed: nothing to check
        pytest.skip("the run ended before SIGTERM")
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted (SIGTERM)" in err
    summary = _summary(out)
    ids = _ids(out / RECORDS_FILE)
    assert summary["n_done"] == len(ids) == len(set(ids)) and summary["interrupted"] == "SIGTERM"


def test_unsupported_combinations_are_refused_naming_the_flag(small_items, small_mmad, tmp_path, capsys,
                                                              monkeypatch):
    code = cli_main(["run", "--task", "mcqa", "--manifest", str(small_mmad), "--out", str(tmp_path / "m"),
                     "--workers", "2", "--no-progress"])
    assert code == 2 and "--workers 2 applies to --task score" in capsys.readouterr().err
    manifest = write_manifest(small_items[:2], tmp_path / "manifest.json")
    code = cli_main(["run", "--manifest", str(manifest), "--out", str(tmp_path / "c"), "--workers", "4",
                     "--concurrency", "2", "--no-progress"])
    assert code == 2 and "--concurrency 2 is below --workers 4" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = cli_main(["run", "--manifest", str(manifest), "--out", str(tmp_path / "r"), "--ray", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install anomalyclaw[ray]" in err and len(err.strip().splitlines()) == 1


def test_a_registry_with_a_custom_tool_is_refused_naming_it(tmp_path):
    from langchain_core.tools import StructuredTool

    from anomalyclaw.tools.registry import ToolRegistry

    registry = ToolRegistry.default()
    registry.drop("fft_spectrum_viz")  # dropping catalog tools is fine: workers drop them too
    ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path / "ok", registry=registry, progress=False)
    registry.add(StructuredTool.from_function(lambda word: word, name="say", description="Say a word."),
                 family="custom", specialty="say a word")
    with pytest.raises(AnomalyClawError, match="say is not from it"):
        ShardedRunner(make_vlm("offline"), workers=2, out_dir=tmp_path / "no", registry=registry, progress=False)


def test_workers_share_the_offline_backends_concurrency_as_one_process_uses_it(tmp_path):
    assert Runner(make_vlm("offline", max_concurrency=1), out_dir=tmp_path / "a").item_concurrency == 2
    assert Runner(make_vlm("offline", max_concurrency=8), out_dir=tmp_path / "b").item_concurrency == 13
    runner = ShardedRunner(make_vlm("offline", max_concurrency=5), workers=2, out_dir=tmp_path / "c")
    assert runner.shares == [3, 2]
    with pytest.raises(ValueError, match="--concurrency 1 is below --workers 2"):
        ShardedRunner(make_vlm("offline", max_concurrency=1), workers=2, out_dir=tmp_path / "d")


def test_openai_backend_with_two_workers_and_two_replicas(small_items, tmp_path, capsys, monkeypatch):
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    key = "sk-anomalyclaw-workers-3c9d1e"
    monkeypatch.setenv("ANOMALYCLAW_API_KEY", key)
    items = small_items[:6]
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    with FakeVLMServer(api_key=key) as a, FakeVLMServer(api_key=key) as b:
        code = cli_main(["run", "--manifest", str(manifest), "--out", str(out), "--backend", "openai",
                         "--base-url", a.base_url, "--base-url", b.base_url, "--model", "fake-vlm",
                         "--workers", "2", "--concurrency", "4", "--no-progress", "--json"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    records = load_records(out / RECORDS_FILE)
    assert sorted(r.item_id for r in records) == sorted(it.item_id for it in items)
    assert not any(r.error for r in records)
    summary = _summary(out)
    assert summary["workers"]["concurrency"] == [2, 2]
    # The replicas' requests, pooled over both workers, are the records' requests.
    assert len(summary["replicas"]) == 2
    assert sum(r["requests"] for r in summary["replicas"]) == summary["requests"] == \
        sum(r.usage["requests"] for r in records)
    assert all(r["requests"] > 0 for r in summary["replicas"])
    assert not [p for p in out.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert key not in printed.out and key not in printed.err


_FIRST_ITEM = """
import importlib, json, sys
from pathlib import Path
from anomalyclaw.eval.running.forkserver import WORKER_PRELOAD
for name in WORKER_PRELOAD:
    importlib.import_module(name)
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.eval.running.runner import Runner, run_sync
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer
from anomalyclaw.config import EndpointConfig
items = load_manifest(Path(sys.argv[1]), split="test")[:1]
before = {name.split(".")[0] for name in sys.modules}
with FakeVLMServer() as server:
    for k, client in enumerate(("langchain", "sdk")):
        endpoint = EndpointConfig(base_url=server.base_url, model="fake-vlm", client=client)
        summary = run_sync(Runner(make_vlm("openai", endpoint), out_dir=Path(sys.argv[2]) / client), items)
        assert summary.n_done == 1 and summary.n_errors == 0, summary
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} - before)))
"""


def test_a_worker_forks_with_what_its_first_item_would_import(small_synth, tmp_path):
    # The fork server imports WORKER_PRELOAD once; a first item (both endpoint clients) in a
    # process that imported only that must import nothing heavy itself, or every worker pays it
    # after its fork (torch, the clients and their HTTP stack: ~2.6 s of CPU each).
    proc = subprocess.run([sys.executable, "-c", _FIRST_ITEM, str(small_synth), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = {"torch", "langchain_openai", "langchain_core", "openai", "aiohttp", "httpx", "tiktoken", "transformers",
             "langgraph", "cv2", "numpy", "PIL", "scipy", "sklearn"}
    assert not new & heavy, sorted(new)


_PARENT = """
import json, sys
from pathlib import Path
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.eval.running.runner import run_sync
from anomalyclaw.eval.running.workers import ShardedRunner
from anomalyclaw.graph.vlm import make_vlm
items = load_manifest(Path(sys.argv[1]), split="test")[:4]
summary = run_sync(ShardedRunner(make_vlm("offline"), workers=2, out_dir=Path(sys.argv[2]), progress=False), items)
assert summary.n_done == 4 and summary.n_errors == 0, summary
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_parent_of_a_workers_run_does_not_import_torch(small_synth, tmp_path):
    # The parent only writes records. Setting torch's threads for the run imported it: 1.6 s of
    # CPU on the cores the fork server was importing on, before the first worker could fork.
    proc = subprocess.run([sys.executable, "-c", _PARENT, str(small_synth), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch" not in json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(load_records(tmp_path / "run" / RECORDS_FILE)) == 4


def test_run_with_workers_starts_their_fork_server_before_reading_the_manifest(small_items, tmp_path, monkeypatch):
    # `run --workers N` starts the fork server first, so that its imports (~3.8 s of CPU) go on
    # while the parent reads the manifest and imports the runner instead of after.
    import anomalyclaw.eval.data.manifests as manifests
    import anomalyclaw.eval.running.forkserver as forkserver

    calls: list[str] = []
    started = forkserver.start_worker_server
    read = manifests.read_manifest
    monkeypatch.setattr(forkserver, "start_worker_server", lambda **kw: calls.append("fork server") or started(**kw))
    monkeypatch.setattr(manifests, "read_manifest", lambda *a, **kw: calls.append("manifest") or read(*a, **kw))
    manifest = write_manifest(small_items[:2], tmp_path / "manifest.json")
    args = ["run", "--manifest", str(manifest), "--no-progress"]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    assert calls == ["manifest"]  # one process: no fork server
    calls.clear()
    assert cli_main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert calls == ["fork server", "manifest"]
    assert len(load_records(tmp_path / "two" / RECORDS_FILE)) == 2


def test_a_started_fork_server_forks_at_once_with_the_workers_imports_done():
    import multiprocessing

    from anomalyclaw.eval.running.forkserver import WORKER_PRELOAD, start_worker_server, worker_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        assert start_worker_server(wait=True) is False
        return
    assert start_worker_server(wait=True) is True
    ctx = worker_context()
    queue = ctx.SimpleQueue()
    process = ctx.Process(target=_modules_loaded, args=(queue, list(WORKER_PRELOAD)))
    process.start()
    loaded = queue.get()
    process.join(timeout=30)
    assert process.exitcode == 0
    # Imported by the server before it forked (without the preload, a child lacks torch and
    # langchain_openai: unpickling its target imports only this module's imports).
    assert loaded == list(WORKER_PRELOAD)


def _modules_loaded(queue, names):
    queue.put([name for name in names if name in sys.modules])


def test_the_summary_says_when_the_workers_fell_back_to_json_actions(small_items, tmp_path, capsys):
    """Under --tool-calling auto the fallback happens in the workers' conversations: the run's
    summary reports it as a one-process run does."""
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    manifest = write_manifest(small_items[:4], tmp_path / "manifest.json")
    out = tmp_path / "run"
    with FakeVLMServer(tools_supported=False) as server:
        code = cli_main(["run", "--manifest", str(manifest), "--out", str(out), "--base-url", server.base_url,
                         "--model", "fake-vlm", "--tool-calling", "auto", "--workers", "2", "--concurrency", "4",
                         "--no-progress", "--json"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert json.loads(printed.out.strip().splitlines()[-1])["tool_calling"].startswith("auto (fell back to json")
    assert _summary(out)["tool_calling"].startswith("auto (fell back to json")


def test_a_pool_whose_workers_keep_dying_stops_after_its_respawn_budget():
    from anomalyclaw.eval.running.workers import RESPAWNS_PER_WORKER, SLOTS_PER_WORKER, WorkerStartError, _SlotPool

    class AlwaysDead(_SlotPool):
        replaced = 0

        def _alive(self, index):
            return False

        async def _replace(self, index):
            self.replaced += 1

    async def go(pool):
        pool._open_slots(0)
        pool._open_slots(1)
        for _ in range(RESPAWNS_PER_WORKER * 2):
            pool.release(await pool.acquire())
        with pytest.raises(WorkerStartError, match=f"--workers: worker processes died {RESPAWNS_PER_WORKER * 2} "
                                                   "times in this run; stopping: finished items are kept"):
            await pool.acquire()
        return pool

    pool = asyncio.run(go(AlwaysDead(2, [])))
    assert pool.replaced == pool.respawns == RESPAWNS_PER_WORKER * 2 and pool._slots.qsize() == 2 * SLOTS_PER_WORKER  # no slot lost
