"""``run --ray ADDRESS`` against a Ray cluster of its own, as on a head node: ``ray start --head``
in another process, the run a separate driver joining it at its address (and through
``--ray auto`` with ``RAY_ADDRESS``), every item exactly once; and a plain ``--ray`` next to
that cluster starts a local Ray of its own instead of joining it.

Its own module, after ``test_ray.py``'s: that module's local Ray is shut down by then."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from anomalyclaw.eval.data.manifests import write_manifest  # noqa: E402
from anomalyclaw.eval.running.records import RECORDS_FILE  # noqa: E402
from anomalyclaw.eval.running.workers import RaySession  # noqa: E402

CLUSTER_CPUS = 3  # not this machine's count, nor a local session's: tells the two apart


@pytest.fixture(scope="module")
def ray_cluster(free_ports):
    """``ray start --head --block`` on a free port; yields ``127.0.0.1:PORT`` once it accepts
    connections and stops the cluster (SIGTERM to the blocking ``ray start``) afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    port = free_ports()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}",
                             f"--num-cpus={CLUSTER_CPUS}", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited {head.returncode}: {head.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                head.kill()
                pytest.fail("ray start --head did not listen within 90 s")
            time.sleep(0.5)
    yield address
    head.terminate()
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def _run(manifest: Path, out: Path, ray_arg: str, ray_address_env: str | None) -> dict:
    """``anomalyclaw run --ray RAY_ARG`` as its own driver process; ``RAY_ADDRESS`` set to
    ``ray_address_env`` (None: unset)."""
    cmd = [sys.executable, "-m", "anomalyclaw", "run", "--manifest", str(manifest), "--out", str(out),
           "--backend", "offline", "--no-progress", "--ray", ray_arg, "--workers", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address_env is not None:
        env["RAY_ADDRESS"] = ray_address_env
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["item_id"] for line in (out / RECORDS_FILE).read_text().splitlines()]


def test_a_driver_joins_the_cluster_at_its_address_and_through_auto(ray_cluster, small_items, tmp_path):
    items = small_items[:8]
    manifest = write_manifest(items, tmp_path / "manifest.json")
    expected = sorted(it.item_id for it in items)
    for ray_arg, ray_address_env, out in ((ray_cluster, None, tmp_path / "by_address"),
                                          ("auto", ray_cluster, tmp_path / "by_auto")):
        result = _run(manifest, out, ray_arg, ray_address_env)
        assert sorted(_ids(out)) == expected, f"--ray {ray_arg}: an item was lost or written twice"
        assert result["n_items"] == len(items) and result["n_errors"] == 0
        run_info = json.loads(sorted(out.glob("run_*.json"))[-1].read_text())
        assert run_info["summary"]["workers"]["kind"] == "ray"
    # Both drivers have left; the cluster they joined is still up.
    socket.create_connection(("127.0.0.1", int(ray_cluster.rsplit(":", 1)[1])), timeout=5).close()


def test_a_plain_ray_starts_its_own_local_cluster_beside_a_running_one(ray_cluster):
    session = RaySession(num_cpus=2)
    try:
        session.start()
        assert session.started
        assert ray.cluster_resources().get("CPU") == 2, "joined the `ray start` cluster instead of starting one"
    finally:
        session.close()
    assert not ray.is_initialized()
