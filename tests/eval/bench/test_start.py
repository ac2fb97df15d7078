"""``anomalyclaw bench start``: the seconds a user waits for a ``--workers`` run's first record."""
from __future__ import annotations

import signal

import pytest

from anomalyclaw.eval.bench.start import VARIANTS, bench_start, format_start

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX processes")


def test_bench_start_times_both_fork_server_starts_in_alternating_real_runs(tmp_path):
    result = bench_start(6, rounds=1, concurrency=4, latency_s=0.05, image_size=64, work_dir=tmp_path)
    rows = result["rows"]
    assert [r["fork server"] for r in rows] == list(VARIANTS)
    for r in rows:  # each a whole `anomalyclaw run --workers 2` in a child process
        assert r["items"] == 6
        assert 0 < r["first_record_s"] <= r["last_record_s"] <= r["exit_s"]
        assert r["items_per_s"] == pytest.approx(6 / r["exit_s"], abs=0.01)
    assert set(result["medians"]) == set(VARIANTS)
    text = format_start(result)
    assert "first thing (median)" in text and "at the first worker (median)" in text
