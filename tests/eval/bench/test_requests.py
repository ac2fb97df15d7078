"""``anomalyclaw bench requests``: the event-loop CPU per request of each client on each
transport, against the fake endpoint in its own process."""
from __future__ import annotations

import pytest

from anomalyclaw.cli import build_parser, cmd_bench
from anomalyclaw.eval.bench.requests import format_requests, request_cpu


def test_each_client_on_each_transport_gets_a_row_per_round():
    rows = request_cpu(requests=12, concurrency=3, image_side=64, rounds=2)
    pairs = [(c, t) for c in ("langchain", "sdk") for t in ("aiohttp", "httpx")]
    assert [(r["client"], r["transport"], r["round"]) for r in rows] == [
        (c, t, k) for k in range(2) for c, t in pairs]
    for r in rows:
        # The loop's own clock is part of the process's; a request costs the loop some CPU.
        assert 0 < r["loop_ms_per_request"] <= r["process_ms_per_request"] + 0.01
        assert r["requests"] == 12 and r["concurrency"] == 3
    lines = format_requests(rows).splitlines()
    assert len(lines) == 2 + len(pairs) and lines[2].split()[:2] == ["langchain", "aiohttp"]
    assert format_requests([]) == "no requests measured"


def test_the_command_line_chooses_clients_transports_and_rounds():
    args = build_parser().parse_args(["bench", "requests", "--client", "sdk", "--transport", "httpx",
                                      "--requests", "50", "--rounds", "2", "--json"])
    assert args.handler is cmd_bench and args.bench_command == "requests"
    assert (args.client, args.transport, args.requests, args.rounds, args.json) == ("sdk", "httpx", 50, 2, True)
    defaults = build_parser().parse_args(["bench", "requests"])
    assert (defaults.client, defaults.transport, defaults.concurrency) == ("langchain,sdk", "aiohttp,httpx", 32)
    for bad in (["--client", "curl"], ["--transport", "h2"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "requests", *bad])
