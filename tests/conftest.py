"""Shared fixtures: the reference data folder (skipped when absent), a small synthetic set, an
MMAD-format question file over another one, and free local ports."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "crossdomainvad12"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is absent (released CrossDomainVAD-12 data)")
    return REFERENCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_ports() -> Callable[[], int]:
    """Call it for a 127.0.0.1 port that was free a moment ago (nothing listens there); also for
    fixtures of a wider scope than a test's."""
    return _free_port


@pytest.fixture
def free_port(free_ports: Callable[[], int]) -> int:
    """A 127.0.0.1 port that was free a moment ago: nothing listens there."""
    return free_ports()


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read a real endpoint or key from the developer's environment."""
    for name in list(os.environ):
        if name.startswith(("ANOMALYCLAW_BASE_URL", "ANOMALYCLAW_API_KEY", "ANOMALYCLAW_MODEL", "OPENAI_",
                            "QWEN_", "GPT_", "SEED_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """A small synthetic benchmark (every domain, 2 test items each); its manifest path."""
    from anomalyclaw.eval.data.synth import generate_benchmark

    return generate_benchmark(tmp_path_factory.mktemp("synth_small"), seed=0, n_test_per_domain=2,
                              n_calibration=0, n_dev=0)


@pytest.fixture(scope="session")
def small_items(small_synth):
    from anomalyclaw.eval.data.manifests import load_manifest

    return load_manifest(small_synth, split="test")


@pytest.fixture(scope="session")
def small_mmad(tmp_path_factory) -> Path:
    """An MMAD-format question file over a small synthetic benchmark (coin tray and hex nut, 4
    test images each); its mmad.json path."""
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.eval.data.synth.mmad import write_mmad_questions

    manifest = generate_benchmark(tmp_path_factory.mktemp("mmad_small"), seed=0, n_test_per_domain=4,
                                  n_calibration=0, n_dev=0, size=128, domains=["S2", "S7"])
    return write_mmad_questions(manifest)


@pytest.fixture
def kill_mid_run():
    """``run(runner, items, after, kill)``: runs ``runner`` on ``items`` and calls ``kill(runner)``
    once ``after`` records are on disk (a worker or actor killed mid-run); returns (the run's
    summary, what ``kill`` returned)."""
    import asyncio
    import time

    from anomalyclaw.eval.running.records import RECORDS_FILE

    def run(runner, items, after, kill):
        records = runner.out_dir / RECORDS_FILE

        async def main():
            task = asyncio.create_task(runner.run(items))
            deadline = time.monotonic() + 240
            while not (records.exists() and records.read_bytes().count(b"\n") >= after):
                assert not task.done(), task
                assert time.monotonic() < deadline, "no records"
                await asyncio.sleep(0.05)
            killed = kill(runner)
            return await task, killed

        return asyncio.run(main())

    return run
