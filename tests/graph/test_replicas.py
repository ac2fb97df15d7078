"""Endpoint replicas: least-outstanding balancing, a failing replica rested and retried, the
run stopped only when every replica is down; against real local fake servers, one killed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from anomalyclaw.config import EndpointConfig
from anomalyclaw.errors import ConfigError, EndpointUnreachableError
from anomalyclaw.eval.running.records import RECORDS_FILE
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.endpoint import check_endpoint
from anomalyclaw.graph.vlm.replicas import EndpointsDownError, ReplicaSet, merge_stats


# ------------------------------------------------------------------------------ the policy
def test_requests_go_to_the_replica_with_fewest_in_flight():
    rs = ReplicaSet(["http://a", "http://b", "http://c"])
    first = [rs.choose() for _ in range(3)]
    assert sorted(r.url for r in first) == ["http://a", "http://b", "http://c"]  # one each
    rs.done(first[1], latency_s=0.1)  # b is free again: it gets the next one
    assert rs.choose().url == "http://b"


def test_a_failing_replica_rests_with_backoff_then_gets_one_probe(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rs = ReplicaSet(["http://a", "http://b"], rest_after=3, down_after_s=60)
    a, b = rs.replicas
    for _ in range(3):
        rs.choose()  # a, then b, ... keep a failing
        rs.done(a, failure="connection failed", replica_fault=True)
        a.in_flight = b.in_flight = 0
    assert a.rest_until == pytest.approx(1001.0) and a.rests == 1
    assert all(rs.choose() is b for _ in range(5))  # a rests while b is there
    b.in_flight = 0
    clock[0] = 1001.5  # the rest is over: one probe
    probe = rs.choose()
    assert probe is a and a.probing
    assert rs.choose() is b  # not a second request while the probe is out
    rs.done(a, failure="HTTP 503", replica_fault=True)  # the probe failed: a longer rest
    assert a.rests == 2 and a.rest_until == pytest.approx(1001.5 + 2.0)
    clock[0] = 1004.0
    probe = rs.choose()
    rs.done(probe, latency_s=0.2)  # recovered
    assert a.failures_in_a_row == 0 and a.rest_until == 0 and not a.probing
    # A 429 is an error but not a reason to rest (the replica is alive, only busy).
    for _ in range(5):
        rs.done(a, failure="HTTP 429", replica_fault=False)
    assert a.errors >= 5 and a.rest_until == 0


def test_the_run_stops_only_when_every_replica_is_down(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rs = ReplicaSet(["http://user:pw@a", "http://b"], rest_after=1, down_after_s=10)
    a, b = rs.replicas
    rs.done(a, failure="connection failed", replica_fault=True)
    clock[0] = 11.0
    rs.choose()  # a is down, b never failed: the run goes on
    rs.done(b, failure="HTTP 500 at http://b", replica_fault=True)
    clock[0] = 22.0
    with pytest.raises(EndpointsDownError) as err:
        rs.choose()
    message = str(err.value)
    assert "all 2 VLM endpoint replicas are down" in message and "http://user:***@a" in message
    assert "http://b" in message and "--resume" in message and "pw" not in message
    # A single endpoint that fails now and then is never skipped, only retried.
    one = ReplicaSet(["http://only"], rest_after=1)
    r = one.choose()
    one.done(r, failure="HTTP 500", replica_fault=True)
    assert one.choose() is r


def test_stats_add_up_across_processes():
    rows = merge_stats([[{"url": "u", "requests": 3, "errors": 1, "ok": 2, "rests": 0, "state": "up",
                          "latencies": [0.1, 0.3]}],
                        [{"url": "u", "requests": 2, "errors": 0, "ok": 2, "rests": 1, "state": "resting",
                          "latencies": [0.2, 0.2]}]])
    assert rows[0]["requests"] == 5 and rows[0]["ok"] == 4 and rows[0]["state"] == "resting"
    assert rows[0]["latency_mean_s"] == pytest.approx(0.2)


def test_several_base_urls_from_flags_and_the_environment():
    cfg = EndpointConfig.from_env(env={"ANOMALYCLAW_BASE_URL": "http://a:1/v1, http://b:2/v1/", "ANOMALYCLAW_MODEL": "m"})
    assert cfg.base_urls == ("http://a:1/v1", "http://b:2/v1")
    flags = EndpointConfig.from_env(env={}, base_url=["http://a/v1", "http://b/v1,http://c/v1", "http://a/v1"], model="m")
    assert flags.base_urls == ("http://a/v1", "http://b/v1", "http://c/v1")
    with pytest.raises(ConfigError, match="'ftp://b' must start with http"):
        EndpointConfig(base_url="http://a,ftp://b", model="m").require()
    from anomalyclaw.cli import build_parser

    args = build_parser().parse_args(["run", "--manifest", "m", "--out", "o", "--base-url", "http://a",
                                      "--base-url", "http://b"])
    assert args.base_url == ["http://a", "http://b"]


# ------------------------------------------------------------------------------ real servers
def _server(latency: float = 0.05) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "anomalyclaw.graph.vlm.fake_server", "--port", "0",
                             "--latency", str(latency)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), url
    return proc, url


@pytest.fixture
def servers():
    procs: list[subprocess.Popen] = []

    def start(n: int, latency: float = 0.05) -> list[str]:
        urls = []
        for _ in range(n):
            proc, url = _server(latency)
            procs.append(proc)
            urls.append(url)
        return urls

    start.procs = procs
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("client", ["langchain", "sdk"])
async def test_a_replica_killed_mid_run_costs_no_item(servers, small_items, tmp_path, client):
    urls = servers(3)
    endpoint = EndpointConfig(base_url=",".join(urls), model="fake-vlm", max_retries=4, backoff_max_s=0.2,
                              timeout_s=10, client=client)
    vlm = make_vlm("openai", endpoint, max_concurrency=6)
    runner = Runner(vlm, out_dir=tmp_path, progress=False, config=None)
    items = small_items[:12]
    task = asyncio.create_task(runner.run(items))
    records = tmp_path / RECORDS_FILE
    while not task.done() and (not records.exists() or records.read_bytes().count(b"\n") < 3):
        await asyncio.sleep(0.02)
    victim = servers.procs[1]
    os.kill(victim.pid, signal.SIGKILL)  # refuses connections from now on; requests in flight are cut
    summary = await task
    assert summary.fatal is None and summary.n_done == len(items)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["item_id"] for r in lines) == sorted(it.item_id for it in items)
    assert all(r["error"] is None and r["direct_error"] is None and r["refute_error"] is None for r in lines)
    stats = {row["url"]: row for row in summary.replicas}
    assert set(stats) == set(urls)
    dead, alive = stats[urls[1]], [stats[urls[0]], stats[urls[2]]]
    assert dead["errors"] >= 1 and dead["ok"] < dead["requests"]
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in alive)
    # Every successful request is counted on the replica that served it.
    assert sum(r["ok"] for r in stats.values()) == sum(len(r["usage"]["calls"]) for r in lines)


async def test_all_replicas_down_stops_the_run_naming_each(servers, small_items, tmp_path):
    urls = servers(2)
    for proc in servers.procs:
        proc.kill()
        proc.wait()
    # Retries that outlast down_after_s: no item can end in its own error before the run sees
    # every replica down (with 3 quick retries, 6 items could all fail inside 0.3 s).
    endpoint = EndpointConfig(base_url=",".join(urls), model="fake-vlm", max_retries=40, backoff_max_s=0.05,
                              timeout_s=5, down_after_s=0.3)
    with pytest.raises(EndpointUnreachableError, match="none of the 2 VLM endpoint replicas answers"):
        check_endpoint(endpoint)
    summary = await Runner(make_vlm("openai", endpoint, max_concurrency=4), out_dir=tmp_path,
                           progress=False).run(small_items[:6])
    assert summary.fatal and "all 2 VLM endpoint replicas are down" in summary.fatal
    assert urls[0] in summary.fatal and urls[1] in summary.fatal and "--resume" in summary.fatal


def test_preflight_passes_with_one_replica_down(servers, caplog):
    urls = servers(2)
    servers.procs[0].kill()
    servers.procs[0].wait()
    endpoint = EndpointConfig(base_url=",".join(urls), model="fake-vlm")
    assert "fake-vlm" in check_endpoint(endpoint)
    assert urls[0] in caplog.text
