"""``run --ray ADDRESS`` against a Ray cluster of its own, as on a head node: ``ray start --head``
in another process, the run a separate driver joining it at its address (and through
``--ray auto`` with ``RAY_ADDRESS``), every item exactly once; and a plain ``--ray`` next to
that cluster starts a local Ray of its own instead of joining it.

The cluster uses Ray's token authentication, with the token in the environment of the head and
of the drivers (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), as a secured cluster does: left
to itself, ``ray start`` turns it on whenever ``~/.ray/auth_token`` exists (any earlier local
``ray.init`` writes one), and a driver given an address does not, so the outcome would depend on
the machine's history and on whether a test before this one had set ``RAY_AUTH_MODE``.

Its own module, after ``test_ray.py``'s: that module's local Ray is shut down by then."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from anomalyclaw.eval.data.manifests import write_manifest  # noqa: E402
from anomalyclaw.eval.running.records import RECORDS_FILE  # noqa: E402
from anomalyclaw.eval.running.workers import RaySession, WorkerStartError, _check_reachable  # noqa: E402

CLUSTER_CPUS = 3  # not this machine's count, nor a local session's: tells the two apart


@pytest.fixture(scope="module")
def ray_cluster(free_ports, tmp_path_factory):
    """``ray start --head --block`` on a free port, with token authentication; yields
    ``(127.0.0.1:PORT, the environment that holds its token)`` once it accepts connections and
    stops the cluster (SIGTERM to the blocking ``ray start``) afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_ports()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log_path = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    log = log_path.open("wb")  # a file, not a pipe: a blocking `ray start` that logs on must never stall
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={CLUSTER_CPUS}", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if head.poll() is not None:
            log.close()
            pytest.fail(f"ray start --head exited {head.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            _check_reachable(address, timeout_s=1)
            break
        except WorkerStartError:
            if time.monotonic() > deadline:
                head.kill()
                pytest.fail("ray start --head did not listen within 90 s")
            time.sleep(0.5)
    yield address, env
    head.terminate()
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    log.close()


def _driver(manifest: Path, out: Path, ray_arg: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``anomalyclaw run --ray RAY_ARG`` as its own driver process, in ``env``."""
    cmd = [sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out", str(out),
           "--backend", "offline", "--no-progress", "--ray", ray_arg, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _run(manifest: Path, out: Path, ray_arg: str, env: dict[str, str]) -> dict:
    """:func:`_driver` with two workers, which must succeed; its ``--json`` summary."""
    done = _driver(manifest, out, ray_arg, env, "--workers", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["item_id"] for line in (out / RECORDS_FILE).read_text().splitlines()]


def test_a_driver_joins_the_cluster_at_its_address_and_through_auto(ray_cluster, small_items, tmp_path):
    items = small_items[:8]
    manifest = write_manifest(items, tmp_path / "manifest.json")
    expected = sorted(it.item_id for it in items)
    address, env = ray_cluster
    for ray_arg, run_env, out in ((address, env, tmp_path / "by_address"),
                                  ("auto", {**env, "RAY_ADDRESS": address}, tmp_path / "by_auto")):
        result = _run(manifest, out, ray_arg, run_env)
        assert sorted(_ids(out)) == expected, f"--ray {ray_arg}: an item was lost or written twice"
        assert result["n_items"] == len(items) and result["n_errors"] == 0
        run_info = json.loads(sorted(out.glob("run_*.json"))[-1].read_text())
        assert run_info["summary"]["workers"]["kind"] == "ray"
    _check_reachable(address)  # both drivers have left; the cluster they joined is still up


def test_a_driver_without_the_clusters_token_is_told_why(ray_cluster, small_items, tmp_path):
    address, env = ray_cluster
    manifest = write_manifest(small_items[:2], tmp_path / "manifest.json")
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    done = _driver(manifest, tmp_path / "run", address, no_token)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot connect to the Ray cluster at {address}" in last and "AuthenticationError" in last, last
    assert env["RAY_AUTH_TOKEN"] not in done.stderr


def test_a_plain_ray_starts_its_own_local_cluster_beside_a_running_one(ray_cluster):
    session = RaySession(num_cpus=2)
    try:
        session.start()
        assert session.started
        assert ray.cluster_resources().get("CPU") == 2, "joined the `ray start` cluster instead of starting one"
    finally:
        session.close()
    assert not ray.is_initialized()
