"""Which waiting VLM request goes first: the one whose item the run started earliest.

A run keeps more items in flight than it has request slots (so that slots stay busy while items
compute), and every item asks for several requests one after another. Served in the order they
are asked for, an item's last request waits behind the first requests of every item started
after it: all items progress in lockstep, each takes several times its own latency, and the run
ends with a long drain. Served by item age, the oldest items finish first and the slots go on
to the next; the same requests are sent, in another order. The runner gives each item its
order (:func:`item_order`); a request made outside any item (a notebook's single call) waits
behind those of items.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import math
from typing import Any, Iterator

#: The order of the item the current task works for (lower: started earlier).
_ITEM_ORDER: contextvars.ContextVar[float] = contextvars.ContextVar("anomalyclaw_item_order", default=math.inf)


@contextlib.contextmanager
def item_order(order: float) -> Iterator[None]:
    """Within the block (and the tasks started in it, which copy the context), requests wait as
    those of the ``order``-th item."""
    token = _ITEM_ORDER.set(float(order))
    try:
        yield
    finally:
        _ITEM_ORDER.reset(token)


def current_item_order() -> float:
    return _ITEM_ORDER.get()


class PrioritySlots:
    """An asyncio semaphore of ``n`` slots whose waiters are served by :func:`current_item_order`
    (lowest first; first come among equals). A released slot is handed to the next waiter, so
    a newcomer cannot take it past one that waits. One event loop's."""

    def __init__(self, n: int):
        self._free = max(1, int(n))
        self._waiting: list[tuple[float, int, asyncio.Future]] = []  # a cancelled waiter's entry stays
        self._live = 0  # waiters neither served nor cancelled
        self._arrival = itertools.count()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._live

    @property
    def free(self) -> int:
        return self._free

    async def acquire(self) -> None:
        if self._free > 0 and not self._live:
            self._free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (current_item_order(), next(self._arrival), future))
        self._live += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():  # cancelled while waiting: its entry is skipped when reached
                self._live -= 1
            else:  # handed a slot as it was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                self._live -= 1
                future.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> "PrioritySlots":
        await self.acquire()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()
