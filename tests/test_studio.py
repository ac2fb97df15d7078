"""LangGraph Studio: ``langgraph.json`` names the three graphs, each builds and runs with the
plain settings context a server sends, and ``langgraph dev`` serves them on a loopback port."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from langgraph.pregel import Pregel

from anomalyclaw.errors import AnomalyClawError, ConfigError

REPO = Path(__file__).resolve().parents[1]
NODES = {"anomalyclaw": {"direct", "propose", "select_tool", "observe", "refute", "commit", "fuse", "localize"},
         "refutation": {"propose", "select_tool", "observe", "refute", "commit"},
         "direct": {"direct"}}


def _graphs() -> dict[str, str]:
    config = json.loads((REPO / "langgraph.json").read_text())
    assert config["dependencies"] == ["."]
    return {name: spec["path"] if isinstance(spec, dict) else spec for name, spec in config["graphs"].items()}


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_langgraph_json_names_each_graph_and_each_builds():
    graphs = _graphs()
    assert set(graphs) == set(NODES)
    for name, path in graphs.items():
        graph = _load(path)({"configurable": {}})  # a factory: langgraph-api calls it with the run config
        assert isinstance(graph, Pregel), name
        assert set(graph.get_graph().nodes) - {"__start__", "__end__"} == NODES[name]
        context = graph.get_context_jsonschema()
        assert {"manifest", "backend", "tool_calling", "max_turns"} <= set(context["properties"])
        assert set(graph.get_input_jsonschema()["properties"]) == {"item_id"}


async def test_studio_graphs_run_from_plain_settings(small_synth, small_items, monkeypatch):
    from anomalyclaw.studio import StudioContext, make_direct, make_pipeline

    monkeypatch.setenv("ANOMALYCLAW_MANIFEST", str(small_synth))
    item = next(it for it in small_items if it.label == 1)
    # what a server sends: JSON settings, coerced into the graph's context schema
    state = await make_pipeline().ainvoke({"item_id": item.item_id}, context={"tool_calling": "native"})
    assert state["tool_calling"] == "native" and 0 <= state["anomaly_score"] <= 1
    # the last node localizes from the same settings (its boxes and the maps' PNG bytes)
    assert state["localization"] is not None and state["localization"]["map_png"], state.get("fallbacks")
    first = await make_direct().ainvoke({}, context=StudioContext())  # no item: the manifest's first
    assert first["direct_label"] in ("normal", "anomalous")
    with pytest.raises(ConfigError, match="no item 'nope'"):
        await make_direct().ainvoke({"item_id": "nope"}, context={})


async def test_a_graph_without_context_says_how_to_run_it(small_items):
    from anomalyclaw.graph.direct import build_direct_graph

    with pytest.raises(AnomalyClawError, match=r"context=make_context\(item, vlm\)"):
        await build_direct_graph().ainvoke({"item_id": small_items[0].item_id})


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_langgraph_dev_serves_the_graphs(small_synth, small_items, tmp_path, free_port):
    """``langgraph dev`` (langgraph-cli[inmem], in the dev extras) starts offline on a free
    loopback port, lists the three graphs and runs one; bounded to 60 s of start-up."""
    pytest.importorskip("langgraph_api", reason="langgraph-cli[inmem] is not installed")
    cli = Path(sys.executable).with_name("langgraph")
    port = free_port
    env = {**os.environ, "ANOMALYCLAW_MANIFEST": str(small_synth), "LANGGRAPH_CLI_NO_ANALYTICS": "1"}
    env.pop("ANOMALYCLAW_BASE_URL", None)
    log = (tmp_path / "dev.log").open("w")
    proc = subprocess.Popen([str(cli), "dev", "--config", str(REPO / "langgraph.json"), "--no-browser", "--host",
                             "127.0.0.1", "--port", str(port), "--no-reload"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/ok", timeout=2) as resp:
                    assert json.loads(resp.read())["ok"] is True
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "langgraph dev did not answer in 60 s"
                time.sleep(0.3)
        listed = {a["graph_id"] for a in _post(base + "/assistants/search", {})}
        assert listed == set(NODES)
        item = next(it for it in small_items if it.label == 1)
        state = _post(base + "/runs/wait", {"assistant_id": "direct", "input": {"item_id": item.item_id}})
        assert state["item_id"] == item.item_id and 0 <= state["direct_score"] <= 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    text = (tmp_path / "dev.log").read_text()
    assert "Blocking call" not in text and "Traceback" not in text, text[-3000:]
