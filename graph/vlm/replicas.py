"""Several replicas of one endpoint: least-outstanding-requests balancing, rest with backoff,
and the one condition that stops a run (every replica down).

A request goes to the replica with the fewest requests in flight (ties: the one that has served
fewest). A replica that refuses connections, times out or answers 5xx ``rest_after`` times in a
row rests: it gets no requests while another replica is available, for a backoff that doubles
with each rest (1 s, 2 s, 4 s ... up to ``rest_max_s``); after its rest one probe request goes
to it, and a success makes it a full member again. When every replica rests, requests go to the
one whose rest ends first, so a single endpoint is retried exactly as before. A replica that has
failed every request for ``down_after_s`` seconds is down; when all are, the run stops with
:class:`EndpointsDownError` naming each (rerun with ``--resume`` when they are back).

Counters live on the :class:`ReplicaSet`, not on an event loop's clients, so they cover a whole
run; :meth:`ReplicaSet.stats` gives requests, errors and latency per replica for the run summary,
and :func:`merge_stats` adds up the stats of several processes (``--workers``, ``--ray``).
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from anomalyclaw.errors import EndpointFatalError

#: Latencies kept per replica for the percentiles (a long run keeps the most recent ones).
_MAX_LATENCIES = 100_000


class EndpointsDownError(EndpointFatalError):
    """Every replica of the endpoint has failed every request for ``down_after_s`` seconds."""


def public_url(url: str) -> str:
    """``url`` with any password blanked (``http://user:***@host/v1``), for summaries and logs."""
    return re.sub(r"(://[^/:@\s]*):[^@/\s]*@", r"\1:***@", url)


@dataclass
class Replica:
    """One replica's state and counters."""

    url: str
    index: int
    in_flight: int = 0
    requests: int = 0
    """Requests sent to it (each attempt counts)."""
    errors: int = 0
    """Attempts that failed (any reason)."""
    failures_in_a_row: int = 0
    """Consecutive connection failures, timeouts and 5xx (a success resets it)."""
    rests: int = 0
    rest_until: float = 0.0
    probing: bool = False
    failing_since: float | None = None
    last_error: str | None = None
    latencies: list[float] = field(default_factory=list)
    """Seconds of each successful request."""

    def ready(self, now: float) -> bool:
        """Whether it may take a request now (not resting, and no probe already in flight)."""
        return self.rest_until <= now and not (self.probing and self.in_flight > 0)

    def down(self, now: float, down_after_s: float) -> bool:
        return self.failing_since is not None and now - self.failing_since >= down_after_s


class ReplicaSet:
    """The replicas of one endpoint (thread-safe: workers of one process share it)."""

    def __init__(self, urls: Sequence[str], *, rest_after: int = 3, rest_max_s: float = 30.0,
                 down_after_s: float = 60.0):
        if not urls:
            raise ValueError("a replica set needs at least one URL")
        if rest_after < 1:
            raise ValueError(f"rest_after must be >= 1, got {rest_after}")
        self.replicas = [Replica(url=u, index=i) for i, u in enumerate(urls)]
        self.rest_after = int(rest_after)
        self.rest_max_s = float(rest_max_s)
        self.down_after_s = float(down_after_s)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.replicas)

    def choose(self) -> Replica:
        """The replica for the next attempt, counted as in flight until :meth:`done`; raises
        :class:`EndpointsDownError` when every replica is down."""
        now = time.monotonic()
        with self._lock:
            if all(r.down(now, self.down_after_s) for r in self.replicas):
                raise EndpointsDownError(self._down_message(now))
            ready = [r for r in self.replicas if r.ready(now)]
            if ready:
                pick = min(ready, key=lambda r: (r.in_flight, r.requests, r.index))
            else:  # all resting: the one back soonest (a single endpoint is simply retried)
                pick = min(self.replicas, key=lambda r: (r.rest_until, r.in_flight, r.index))
            if pick.failures_in_a_row >= self.rest_after:
                pick.probing = True
            pick.in_flight += 1
            pick.requests += 1
            return pick

    def done(self, replica: Replica, *, latency_s: float | None = None, failure: str | None = None,
             replica_fault: bool = False) -> None:
        """Count one finished attempt on ``replica``: a success (``latency_s``), a failure
        (``failure``: what went wrong; ``replica_fault``: refused, timed out or 5xx, which counts
        towards a rest), or neither (cancelled)."""
        now = time.monotonic()
        with self._lock:
            replica.in_flight = max(0, replica.in_flight - 1)
            if latency_s is not None:
                replica.failures_in_a_row = replica.rests = 0
                replica.failing_since = None
                replica.rest_until = 0.0
                replica.probing = False
                replica.latencies.append(float(latency_s))
                if len(replica.latencies) > _MAX_LATENCIES:
                    del replica.latencies[: len(replica.latencies) - _MAX_LATENCIES]
                return
            if failure is None:
                return
            replica.errors += 1
            replica.last_error = failure
            if not replica_fault:
                return
            replica.failures_in_a_row += 1
            if replica.failing_since is None:
                replica.failing_since = now
            if replica.failures_in_a_row >= self.rest_after:
                replica.rest_until = now + min(self.rest_max_s, 2.0 ** replica.rests)
                replica.rests += 1
                replica.probing = False

    def _down_message(self, now: float) -> str:
        parts = [f"{public_url(r.url)} ({r.last_error or 'no reply'}; failing for {now - (r.failing_since or now):.0f} s, "
                 f"{r.errors} failed of {r.requests} attempts)" for r in self.replicas]
        what = "the VLM endpoint is" if len(self.replicas) == 1 else f"all {len(self.replicas)} VLM endpoint replicas are"
        return (f"{what} down: " + "; ".join(parts) + f". Nothing answered for {self.down_after_s:g} s "
                "(ANOMALYCLAW_DOWN_AFTER_S); finished items are kept: rerun with --resume when the endpoint is back")

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: ``url`` (password blanked), ``requests``, ``errors``, ``ok``, latency
        ``latency_mean_s`` / ``latency_p50_s`` / ``latency_p95_s`` of successful requests,
        ``rests``, ``state`` (up, resting or down) and ``latencies`` (for :func:`merge_stats`)."""
        now = time.monotonic()
        with self._lock:
            rows = []
            for r in self.replicas:
                state = "down" if r.down(now, self.down_after_s) else ("resting" if r.rest_until > now else "up")
                rows.append({"url": public_url(r.url), "requests": r.requests, "errors": r.errors,
                             "ok": len(r.latencies), "rests": r.rests, "state": state,
                             "last_error": r.last_error, "latencies": list(r.latencies)})
        return [_with_percentiles(row) for row in rows]


def _with_percentiles(row: dict[str, Any]) -> dict[str, Any]:
    lat = np.asarray(row.get("latencies") or [], float)
    row["latency_mean_s"] = round(float(lat.mean()), 4) if lat.size else None
    row["latency_p50_s"] = round(float(np.percentile(lat, 50)), 4) if lat.size else None
    row["latency_p95_s"] = round(float(np.percentile(lat, 95)), 4) if lat.size else None
    return row


def merge_stats(groups: Iterable[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The per-replica stats of several processes added up, by URL (latencies pooled)."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in groups:
        for row in rows or ():
            into = merged.setdefault(row["url"], {"url": row["url"], "requests": 0, "errors": 0, "ok": 0, "rests": 0,
                                                  "state": "up", "last_error": None, "latencies": []})
            for key in ("requests", "errors", "ok", "rests"):
                into[key] += int(row.get(key) or 0)
            into["latencies"].extend(row.get("latencies") or [])
            into["last_error"] = row.get("last_error") or into["last_error"]
            if row.get("state") == "down" or (row.get("state") == "resting" and into["state"] == "up"):
                into["state"] = row["state"]
    return [_with_percentiles(row) for row in merged.values()]


def without_latencies(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stats as a summary prints and stores them (the raw latencies left out)."""
    return [{k: v for k, v in row.items() if k != "latencies"} for row in rows]
