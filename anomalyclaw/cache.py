"""The one cache policy every part uses: a thread-safe, size-aware least-recently-used map.

Reference images, their features and encodings, fitted experts and per-reference-set
calibrations are shared by every item that uses the same files, so each is computed once per
process and kept while it is among the most recently used. Every :class:`LRUCache` registers
itself by name: :func:`cache_stats` reports hits, misses, entries and bytes of all of them (the
run summary prints it) and :func:`clear_caches` empties them all (after editing files in
place, or between benchmarks).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_REGISTRY: "weakref.WeakSet[LRUCache[Any, Any]]" = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()


def approx_nbytes(value: Any) -> int:
    """Bytes held by ``value``: arrays, bytes and strings, and tuples, lists and dicts of them
    (other objects count 0; give the cache a ``sizeof`` for those)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(approx_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(approx_nbytes(v) for v in value.values())
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if isinstance(nbytes, (int, np.integer)) else 0


class _InFlight:
    """A computation under way: the thread doing it, and an event its waiters wait on."""

    __slots__ = ("owner", "done")

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.done = threading.Event()


class LRUCache(Generic[K, V]):
    """A least-recently-used map bounded by entries (``max_items``) and/or bytes (``max_bytes``,
    measured by ``sizeof``, default :func:`approx_nbytes`).

    :meth:`get_or_compute` computes a missing value outside the lock, once: a second thread
    asking for a key under computation waits for it instead of computing it again (if the
    computation fails, the waiter computes it itself). A value larger than ``max_bytes`` is
    returned but not kept. ``name`` is how :func:`cache_stats` reports it.
    """

    def __init__(self, name: str, *, max_items: int | None = None, max_bytes: int | None = None,
                 sizeof: Callable[[Any], int] = approx_nbytes):
        if max_items is not None and max_items < 1:
            raise ValueError(f"cache {name!r}: max_items must be >= 1, got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"cache {name!r}: max_bytes must be >= 0, got {max_bytes}")
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._in_flight: dict[K, _InFlight] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        with _REGISTRY_LOCK:
            _REGISTRY.add(self)

    def __repr__(self) -> str:
        return f"LRUCache({self.name!r}, items={len(self)}, bytes={self._bytes})"

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def get(self, key: K, default: Any = None) -> V | Any:
        """The value of ``key`` (now the most recently used), else ``default``; counts a hit or
        a miss."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
            self.misses += 1
            return default

    def put(self, key: K, value: V) -> V:
        """Keep ``value`` under ``key`` (evicting the least recently used beyond the bounds)."""
        size = int(self._sizeof(value))
        with self._lock:
            self._store(key, value, size)
        return value

    def _store(self, key: K, value: V, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._data[key] = (value, size)
        self._bytes += size
        while self._data and ((self.max_items is not None and len(self._data) > self.max_items)
                              or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            _, (_, dropped) = self._data.popitem(last=False)
            self._bytes -= dropped
            self.evictions += 1

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value of ``key``, or ``compute()`` kept under it (see the class docstring)."""
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return self._data[key][0]
                flight = self._in_flight.get(key)
                if flight is None or flight.owner == threading.get_ident():
                    # Ours to compute (a nested request from the computing thread computes too,
                    # rather than wait for itself).
                    mine = _InFlight()
                    if flight is None:
                        self._in_flight[key] = mine
                    self.misses += 1
                    break
            flight.done.wait()
        try:
            value = compute()
            size = int(self._sizeof(value))
            with self._lock:
                self._store(key, value, size)
            return value
        finally:
            with self._lock:
                if self._in_flight.get(key) is mine:
                    del self._in_flight[key]
            mine.done.set()

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        """``{"hits", "misses", "evictions", "items", "bytes", "max_items", "max_bytes"}``."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "items": len(self._data), "bytes": self._bytes, "max_items": self.max_items,
                    "max_bytes": self.max_bytes}


def cache_stats() -> dict[str, dict[str, Any]]:
    """Every live cache's :meth:`LRUCache.stats` by name (caches that share a name are summed),
    sorted by name."""
    with _REGISTRY_LOCK:
        caches = list(_REGISTRY)
    out: dict[str, dict[str, Any]] = {}
    for cache in caches:
        s = cache.stats()
        if cache.name in out:
            total = out[cache.name]
            for k in ("hits", "misses", "evictions", "items", "bytes"):
                total[k] += s[k]
        else:
            out[cache.name] = s
    return dict(sorted(out.items()))


def clear_caches() -> None:
    """Empty every cache of the process (reference images, features, fitted experts,
    calibrations, encoded images)."""
    with _REGISTRY_LOCK:
        caches = list(_REGISTRY)
    for cache in caches:
        cache.clear()
