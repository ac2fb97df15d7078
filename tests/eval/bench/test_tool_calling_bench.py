"""The json-vs-native bench: same scripted decisions, four requests per item in both modes,
bytes measured by the server and the client."""
from __future__ import annotations

from anomalyclaw.eval.bench.toolcalling import SCRIPT_TOOLS, format_tool_calling, run_tool_calling_bench


def test_tool_calling_bench_compares_the_same_items(small_items):
    items = [next(it for it in small_items if it.label == 1)]
    result = run_tool_calling_bench(items)
    by_mode = {r["mode"]: r for r in result["modes"]}
    assert set(by_mode) == {"json", "native"}
    for r in by_mode.values():
        assert r["requests_per_item"] == 4 and r["errors"] == 0  # direct, propose, refute, refute
        assert r["tools_used"] == [list(SCRIPT_TOOLS)] * len(items)
        # the client's own count is within a few hundred bytes of what the server received
        assert abs(r["client_request_bytes_per_item"] - r["request_bytes_per_item"]) < 0.02 * r["request_bytes_per_item"]
    assert by_mode["json"]["tool_calls"] == 0 and by_mode["json"]["requests_with_tools"] == 0
    assert by_mode["native"]["tool_calls"] == 2 * len(items)
    assert by_mode["native"]["requests_with_tools"] == 3 * len(items)  # propose and both refutes
    assert by_mode["json"]["bytes_vs_first"] == 1.0
    assert by_mode["native"]["bytes_vs_first"] == by_mode["native"]["request_bytes_per_item"] / \
        by_mode["json"]["request_bytes_per_item"]
    table = format_tool_calling(result)
    assert "native" in table and "requests/item" in table
