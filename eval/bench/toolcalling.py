"""Requests and request bytes per item: JSON actions against native tool calling
(``anomalyclaw bench tool-calling``).

The same items get the same scripted decisions in each mode, from the local fake endpoint
(which turns a scripted JSON action into a tool call when the request offers tools): the direct
judgment, a proposal that tests its candidate with ``side_by_side_compare``, a refute turn that
asks for ``region_zoom``, and a refute turn that commits; four requests per item. What differs
is what crosses the wire: in ``json`` mode the prompt lists every applicable tool with its
compact argument schema and the actions are JSON in the reply; in ``native`` mode each
refutation request carries the applicable tools' full function schemas, the prompt lists only
names and specialties, and results come back as tool messages. Bytes are counted by the server
(request bodies as received) and by the client (``usage.request_bytes``).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.items import Item
from anomalyclaw.loops import run_loop

__all__ = ["SCRIPT_TOOLS", "format_tool_calling", "run_tool_calling_bench"]

#: The tools the scripted refutation calls, in order.
SCRIPT_TOOLS = ("side_by_side_compare", "region_zoom")
_BOX = [0.25, 0.25, 0.75, 0.75]


def _script(n_items: int) -> dict[str, list[str]]:
    from anomalyclaw.graph.replies import COMMIT, propose_reply, refute_reply, tool_action

    propose = propose_reply(0.6, [{"id": "c1", "description": "region that differs from the references",
                                   "bbox": _BOX}], tool_action(SCRIPT_TOOLS[0], {"bbox": _BOX}, "c1"),
                            "compare the region with the closest reference")
    again = refute_reply([{"id": "c1", "status": "uncertain", "evidence": "unclear at this scale"}], 0.5,
                         tool_action(SCRIPT_TOOLS[1], {"bbox": _BOX}, "c1"), "look closer")
    done = refute_reply([{"id": "c1", "status": "refuted", "evidence": "also in a reference"}], 0.2, COMMIT,
                        "explained by the references")
    return {"propose": [propose] * n_items, "refute": [again, done] * n_items}


async def _run_mode(items: Sequence[Item], mode: str, client: str, config: AgentConfig) -> dict[str, Any]:
    from anomalyclaw.graph.context import make_context
    from anomalyclaw.graph.pipeline import build_pipeline
    from anomalyclaw.graph.state import new_state
    from anomalyclaw.graph.vlm import make_vlm
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    graph = build_pipeline()
    cfg = dataclasses.replace(config, tool_calling=mode)
    client_bytes = 0
    tools_used: list[list[str]] = []
    errors = 0
    start = time.perf_counter()
    # One item at a time, so the per-stage scripts pair each reply with its item.
    with FakeVLMServer(script=_script(len(items))) as server:
        vlm = make_vlm("openai", EndpointConfig(base_url=server.base_url, model="fake-vlm", client=client,
                                                timeout_s=30.0, max_retries=1))
        for item in items:
            state = await graph.ainvoke(new_state(item.item_id), context=make_context(item, vlm, config=cfg))
            calls = list(state.get("calls", [])) + list(state.get("direct_calls", []))
            client_bytes += sum(c.get("request_bytes") or 0 for c in calls)
            tools_used.append(list(state.get("tools_used", [])))
            errors += int(state.get("anomaly_score") is None)
        await vlm.aclose()
        stats = server.stats
    n = len(items)
    return {"mode": mode, "items": n, "requests": stats.requests, "requests_per_item": stats.requests / n,
            "request_bytes_per_item": stats.bytes_in / n, "client_request_bytes_per_item": client_bytes / n,
            "tool_calls": stats.tool_calls, "requests_with_tools": stats.with_tools,
            "tools_used": tools_used, "errors": errors, "seconds": round(time.perf_counter() - start, 2)}


def run_tool_calling_bench(items: Sequence[Item] | None = None, *, modes: Sequence[str] = ("json", "native"),
                           client: str = "langchain", config: AgentConfig | None = None) -> dict[str, Any]:
    """Run ``items`` (default: the 14 items of a small synthetic benchmark, two per domain) through the pipeline against the
    fake endpoint in each tool-calling mode; per mode, requests and request bytes per item, and
    each mode's bytes as a ratio of the first mode's."""
    config = config or AgentConfig()
    with tempfile.TemporaryDirectory(prefix="anomalyclaw-bench-tc-") as tmp:
        if items is None:
            from anomalyclaw.eval.data.manifests import load_manifest
            from anomalyclaw.eval.data.synth import generate_benchmark

            manifest = generate_benchmark(Path(tmp) / "synth", seed=0, n_test_per_domain=2, n_calibration=0,
                                          n_dev=0)
            items = load_manifest(manifest, split="test")
        results = [run_loop(_run_mode(items, mode, client, config)) for mode in modes]
    base = results[0]["request_bytes_per_item"]
    for r in results:
        r["bytes_vs_first"] = r["request_bytes_per_item"] / base if base else None
    return {"client": client, "items": len(items), "script_tools": list(SCRIPT_TOOLS), "modes": results}


def format_tool_calling(result: dict[str, Any]) -> str:
    """The result as a table: requests and KB per item for each mode."""
    first = result["modes"][0]["mode"]
    lines = [f"tool calling, {result['items']} items, client {result['client']}, scripted decisions: "
             f"{' then '.join(result['script_tools'])}, then commit",
             f"{'mode':<8} {'requests/item':>13} {'KB/item (server)':>17} {'KB/item (client)':>17} "
             f"{'vs ' + first:>8} {'tool calls':>10} {'errors':>6}"]
    for r in result["modes"]:
        lines.append(f"{r['mode']:<8} {r['requests_per_item']:>13.2f} {r['request_bytes_per_item'] / 1024:>17.1f} "
                     f"{r['client_request_bytes_per_item'] / 1024:>17.1f} {r['bytes_vs_first']:>7.3f}x "
                     f"{r['tool_calls']:>10} {r['errors']:>6}")
    return "\n".join(lines)
