"""The memory benchmark's smallest configuration, end to end (no memory figure is asserted:
the bench reports it, ``anomalyclaw bench memory`` at full size)."""
from __future__ import annotations

import json
import sys

import pytest

from anomalyclaw.eval.bench.memory import format_memory, measure_decode, run_memory_bench


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples /proc")
def test_smallest_memory_bench_measures_both_runs(tmp_path):
    result = run_memory_bench(12, baseline_items=4, image_size=64, domains=("S1",), concurrency=2,
                              work_dir=tmp_path, sample_s=0.1, decode=False)
    json.dumps(result)
    assert (result["items"], result["baseline_items"], result["errors"]) == (12, 4, 0)
    assert result["distinct_images"] >= 2 and result["peak_rss_mb"] > 50 and result["baseline_peak_rss_mb"] > 50
    assert 0.5 < result["peak_ratio"] < 3
    assert "peak RSS over 12 items" in format_memory(result)


def test_the_decode_measurement_sees_the_budget_at_work():
    row = measure_decode(2, 2000, 1500, threads=2, max_side=256, budget_mb=8)
    assert row["decoded_mb_per_image"] == round(2000 * 1500 * 3 / 2**20, 1) and row["peak_extra_rss_mb"] > 0
    assert row["ratio_to_pixels"] > 0 and row["budget_waits"] in (0, 1)  # a wait only if the loads overlap
