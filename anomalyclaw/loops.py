"""Which event loop a run's coroutines run on: uvloop (libuv, in Cython) where it is installed,
else asyncio's own.

One process judges every item on one event loop, and at high concurrency that loop is the
limit: its callbacks, the HTTP client's reads and writes and the compute threads' hand-backs
(``call_soon_threadsafe``) all run there under the one GIL. uvloop runs the same asyncio
programs with less of the loop's own CPU in each of those (``anomalyclaw bench scale --loop
asyncio,uvloop`` measures it). ``auto`` (the default) takes uvloop when it can be imported;
``ANOMALYCLAW_LOOP`` or ``anomalyclaw run --loop`` choose. Worker processes run on the kind their
parent runs on; a Ray actor runs on the loop Ray makes for it (Ray, too, takes uvloop where it is
installed). A run's ``run_*.json`` says which it ran on (``event_loop``, and the workers'
``summary.workers.event_loops``).
"""
from __future__ import annotations

import asyncio
import importlib
import os
from typing import Any, Coroutine, TypeVar

from anomalyclaw.errors import ConfigError

__all__ = ["LOOPS", "ENV", "resolve_loop", "run_loop", "running_loop_kind"]

#: The choices: ``auto`` is uvloop when it is installed, else asyncio.
LOOPS = ("auto", "uvloop", "asyncio")
ENV = "ANOMALYCLAW_LOOP"
UVLOOP_MISSING = "the uvloop event loop needs uvloop, which is not installed: pip install uvloop (or choose asyncio)"

T = TypeVar("T")


def _has_uvloop() -> bool:
    try:
        importlib.import_module("uvloop")  # a dependency where the platform has it
    except ImportError:
        return False
    return True


def resolve_loop(name: str | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"`` for ``name`` (else ``ANOMALYCLAW_LOOP``, else ``auto``);
    :class:`ConfigError` naming the value and where it came from when it is unknown, or when
    uvloop is asked for and not installed."""
    where = "--loop"
    if name is None:
        name, where = os.environ.get(ENV) or "auto", ENV
    value = name.strip().lower()
    if value not in LOOPS:
        raise ConfigError(f"unknown event loop {name!r} ({where}): choose one of {', '.join(LOOPS)}")
    if value == "auto":
        return "uvloop" if _has_uvloop() else "asyncio"
    if value == "uvloop" and not _has_uvloop():
        raise ConfigError(f"{where}={name}: {UVLOOP_MISSING}")
    return value


def run_loop(main: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """``asyncio.run(main)`` on a new loop of the kind :func:`resolve_loop` gives for ``loop``."""
    try:
        kind = resolve_loop(loop)
    except BaseException:
        main.close()  # never awaited: say so quietly rather than with a RuntimeWarning
        raise
    if kind == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.run(main)
    return asyncio.run(main)


def running_loop_kind() -> str | None:
    """``"uvloop"`` or ``"asyncio"`` for the loop running in this thread (None: none runs)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"
