"""The event loop a run runs on: uvloop by default where installed, asyncio on request, a clear
error for anything else (anomalyclaw.loops)."""
from __future__ import annotations

import asyncio
import json
import sys

import pytest

from anomalyclaw import loops
from anomalyclaw.errors import ConfigError
from anomalyclaw.eval.running.runner import Runner, run_sync
from anomalyclaw.graph.vlm import make_vlm

uvloop = pytest.importorskip("uvloop")


async def _kind() -> str | None:
    return loops.running_loop_kind()


async def _get_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.parametrize("name, kind", [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio"),
                                        (" AsyncIO ", "asyncio")])
def test_each_choice_runs_the_coroutine_on_its_loop(name, kind):
    assert loops.resolve_loop(name) == kind
    assert loops.run_loop(_kind(), loop=name) == kind
    assert isinstance(loops.run_loop(_get_loop(), loop=name), uvloop.Loop) == (kind == "uvloop")


def test_the_environment_chooses_when_no_name_is_given(monkeypatch):
    monkeypatch.setenv(loops.ENV, "asyncio")
    assert loops.run_loop(_kind()) == "asyncio"
    monkeypatch.delenv(loops.ENV)
    assert loops.run_loop(_kind()) == "uvloop"  # auto, with uvloop installed
    assert loops.running_loop_kind() is None  # no loop runs here


def test_an_unknown_loop_is_refused_naming_the_value_and_where_it_came_from(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown event loop 'trio' \(--loop\): choose one of auto, uvloop, asyncio"):
        loops.resolve_loop("trio")
    monkeypatch.setenv(loops.ENV, "curio")
    coro = _kind()
    with pytest.raises(ConfigError, match=r"'curio' \(ANOMALYCLAW_LOOP\)"):
        loops.run_loop(coro)
    assert coro.cr_frame is None  # closed, not left to warn that it was never awaited


def test_without_uvloop_auto_falls_back_and_uvloop_asked_for_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an interpreter without it finds
    assert loops.resolve_loop("auto") == "asyncio"
    assert loops.run_loop(_kind()) == "asyncio"
    with pytest.raises(ConfigError, match="pip install uvloop"):
        loops.resolve_loop("uvloop")


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_a_run_records_the_loop_it_ran_on(small_items, tmp_path, name):
    run_sync(Runner(make_vlm("offline"), out_dir=tmp_path, progress=False), small_items[:2], loop=name)
    (info,) = tmp_path.glob("run_*.json")
    data = json.loads(info.read_text())
    assert data["event_loop"] == name and data["summary"]["n_done"] == 2
