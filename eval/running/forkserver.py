"""The process that ``--workers`` processes fork from, startable before anything heavy is imported.

A worker process forks from a *fork server* (where the platform has one; else it is spawned) that
imports, once, what every worker needs (:data:`WORKER_PRELOAD`: ~3.8 s of CPU on a 2-core
machine). Started by the first worker, that import would come first in every ``--workers`` run,
with the machine otherwise idle: on a 1,418-item run at concurrency 128 against a 1 s endpoint it
was 3.7 s of a 44 s run. :func:`start_worker_server` starts it at once instead, so it imports while
the caller does its own start-up; ``anomalyclaw run --workers N`` calls it before it reads the
manifest or imports the runner. This module imports only the standard library, so that calling it
first costs nothing.
"""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

#: What the fork server imports once, so that each worker forks with it imported: the runner, and
#: what its first item would import on its own (the project imports these lazily, for the
#: commands that never need them): torch for the experts, and the endpoint clients with their
#: HTTP stack. Without the last four, each worker spent ~2.6 s of CPU importing them after its
#: fork, every worker at once on the same cores (``tests/eval/running/test_workers.py`` checks
#: that a first item imports none of them).
WORKER_PRELOAD = ("anomalyclaw.eval.running.workers", "torch", "langchain_openai", "openai", "aiohttp")


def worker_context() -> BaseContext:
    """The multiprocessing context worker processes start in: ``forkserver`` (preloading
    :data:`WORKER_PRELOAD`) where the platform has it, else ``spawn``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_PRELOAD))
    return ctx


def _nothing() -> None:
    """A process that does nothing (:func:`start_worker_server`'s ``wait``)."""


def start_worker_server(*, wait: bool = False) -> bool:
    """Start the fork server now (it then imports :data:`WORKER_PRELOAD` beside the caller) and
    return True; False where there is none (the workers are spawned, each importing on its own).
    Returns at once, or with ``wait`` once the server can fork (its imports done: it forks one
    process that does nothing); a server already running is kept. It lives as long as this
    process and serves every later pool of workers."""
    ctx = worker_context()
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    forkserver.ensure_running()
    if wait:
        probe = ctx.Process(target=_nothing, name="anomalyclaw-forkserver-probe", daemon=True)
        probe.start()
        probe.join()
    return True
