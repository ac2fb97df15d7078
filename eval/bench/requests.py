"""Event-loop CPU per request of each endpoint client on each HTTP transport
(``anomalyclaw bench requests``).

One chat request with one image data URL (a noisy JPEG, as the references are sent), sent
``requests`` times with ``concurrency`` in flight to the fake endpoint in its own process (no
latency, so connections go idle between requests as they do against a fast server). What is
measured is the event-loop thread's own CPU clock over the requests (the process's too, which
adds the worker threads: the ``sdk`` client builds its body off the loop), per request: the
client library, the HTTP stack and this project's request discipline, without a graph, tools
or experts. A whole run's share of it is ``anomalyclaw bench profile``'s event-loop figure.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Sequence

import numpy as np

from anomalyclaw.config import CLIENTS, TRANSPORTS
from anomalyclaw.loops import run_loop
from anomalyclaw.eval.bench.profile import median_series

__all__ = ["format_requests", "request_cpu"]


def _message(side: int) -> list[Any]:
    from langchain_core.messages import HumanMessage

    from anomalyclaw.imaging import encode_image, to_data_url

    noisy = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    return [HumanMessage(content=[{"type": "text", "text": "Judge the image."},
                                  {"type": "image_url", "image_url": {"url": to_data_url(encode_image(noisy, "JPEG"))}}])]


async def _timed(vlm: Any, messages: list[Any], requests: int, concurrency: int) -> tuple[float, float]:
    await asyncio.gather(*[vlm.acall(messages, stage="direct") for _ in range(concurrency)])  # connect, warm
    loop_cpu, process_cpu = time.thread_time(), time.process_time()
    await asyncio.gather(*[vlm.acall(messages, stage="direct") for _ in range(requests)])
    loop_cpu, process_cpu = time.thread_time() - loop_cpu, time.process_time() - process_cpu
    await vlm.aclose()
    return loop_cpu, process_cpu


def request_cpu(*, clients: Sequence[str] = CLIENTS, transports: Sequence[str] = TRANSPORTS, requests: int = 600,
                concurrency: int = 32, image_side: int = 384, rounds: int = 1) -> list[dict[str, Any]]:
    """One row per (client, transport) and round, the pairs alternating within a round:
    ``loop_ms_per_request`` (the event-loop thread's CPU) and ``process_ms_per_request``."""
    from anomalyclaw.config import EndpointConfig
    from anomalyclaw.eval.bench.throughput import fake_endpoint_process
    from anomalyclaw.graph.vlm import make_vlm

    messages = _message(image_side)
    rows = []
    with fake_endpoint_process(0.0) as url:
        for round_, (client, transport) in itertools.product(range(rounds), itertools.product(clients, transports)):
            endpoint = EndpointConfig(base_url=url, model="fake-vlm", client=client, transport=transport)
            vlm = make_vlm("openai", endpoint, max_concurrency=concurrency)
            loop_cpu, process_cpu = run_loop(_timed(vlm, messages, requests, concurrency))
            rows.append({"client": client, "transport": transport, "round": round_, "requests": requests,
                         "concurrency": concurrency, "loop_ms_per_request": round(1000 * loop_cpu / requests, 3),
                         "process_ms_per_request": round(1000 * process_cpu / requests, 3)})
    return rows


def format_requests(rows: Sequence[dict[str, Any]]) -> str:
    """Each (client, transport): its rounds' event-loop CPU per request and their median."""
    if not rows:
        return "no requests measured"
    first = rows[0]
    lines = [f"CPU per request: {first['requests']} requests, {first['concurrency']} in flight, one image each, "
             "fake endpoint without latency (ms per request, by round)",
             f"{'client':<10} {'transport':<9} {'event loop':>36} {'process':>36}"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["client"], r["transport"]), []).append(r)
    for (client, transport), group in groups.items():
        loop = median_series([r["loop_ms_per_request"] for r in group], digits=2)
        process = median_series([r["process_ms_per_request"] for r in group], digits=2)
        lines.append(f"{client:<10} {transport:<9} {loop:>36} {process:>36}")
    return "\n".join(lines)
