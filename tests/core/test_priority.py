"""Request slots served oldest item first (anomalyclaw.priority) and the runner's use of them."""
from __future__ import annotations

import asyncio

import pytest

from anomalyclaw.priority import PrioritySlots, current_item_order, item_order


def test_waiting_requests_get_a_slot_by_item_order_then_arrival():
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        served: list[str] = []
        await slots.acquire()  # held, so everyone below waits

        async def ask(name: str, order: float) -> None:
            with item_order(order):
                async with slots:
                    served.append(name)
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(ask(n, o)) for n, o in [("new", 9), ("old", 1), ("older", 0), ("old again", 1)]]
        await asyncio.sleep(0.01)
        assert slots.waiting == 4 and slots.free == 0
        slots.release()
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(main()) == ["older", "old", "old again", "new"]


def test_a_request_outside_any_item_waits_behind_items_and_orders_do_not_leak():
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        served: list[str] = []
        await slots.acquire()

        async def ask(name: str, order: float | None) -> None:
            if order is None:
                async with slots:
                    served.append(name)
                return
            with item_order(order):
                async with slots:
                    served.append(name)

        tasks = [asyncio.create_task(ask("notebook call", None)), asyncio.create_task(ask("item", 5))]
        await asyncio.sleep(0.01)
        slots.release()
        await asyncio.gather(*tasks)
        assert current_item_order() == float("inf")
        return served

    assert asyncio.run(main()) == ["item", "notebook call"]


def test_a_cancelled_waiter_gives_up_its_place_and_a_slot_handed_to_it_moves_on():
    async def main() -> None:
        slots = PrioritySlots(2)
        await slots.acquire()
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        first.cancel()  # cancelled while waiting: its place is skipped
        with pytest.raises(asyncio.CancelledError):
            await first
        slots.release()
        await asyncio.wait_for(second, 1)
        # Handed a slot and cancelled before it ran: the slot goes back, not lost.
        third = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0.01)
        slots.release()  # hands the slot to `third`...
        third.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await third
        assert slots.free == 1 and slots.waiting == 0
        slots.release()  # `second`'s
        assert slots.free == 2

    asyncio.run(main())


@pytest.mark.parametrize("client", ["langchain", "sdk"])
async def test_an_endpoint_serves_the_older_items_waiting_request_first(client):
    """Through the real clients: with one slot held, a request of item 1 asked after one of item 5
    reaches the endpoint first."""
    from langchain_core.messages import HumanMessage

    from anomalyclaw.config import EndpointConfig
    from anomalyclaw.graph.vlm import make_vlm
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    with FakeVLMServer(latency_s=0.3, record_bodies=True) as server:
        endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key="sk-unused",
                                           timeout_s=5.0, max_retries=0, client=client)
        vlm = make_vlm("openai", endpoint, max_concurrency=1)

        async def ask(text: str, order: float) -> None:
            with item_order(order):
                await vlm.acall([HumanMessage(text)], stage="direct")

        holder = asyncio.create_task(ask("holder", 0))
        await asyncio.sleep(0.1)  # the holder's request is at the endpoint, holding the one slot
        newer = asyncio.create_task(ask("item five", 5))
        await asyncio.sleep(0.05)
        older = asyncio.create_task(ask("item one", 1))
        await asyncio.gather(holder, newer, older)
        await vlm.aclose()
    texts = [b["messages"][0]["content"] for b in server.bodies]
    assert texts == ["holder", "item one", "item five"]


async def test_the_runner_and_a_worker_give_each_item_its_start_order(small_items, tmp_path):
    """The one-process runner and a worker's batch judge both put each item's requests under the
    order in which the item got its slot (the worker's runner never drives items itself)."""
    from anomalyclaw.eval.running.runner import Runner
    from anomalyclaw.eval.running.workers import _BatchJudge
    from anomalyclaw.graph.vlm import make_vlm

    seen: dict[str, float] = {}

    class Spy(Runner):
        async def judge(self, item):
            seen[item.item_id] = current_item_order()
            return await super().judge(item)

    items = small_items[:5]
    runner = Spy(make_vlm("offline", max_concurrency=2), out_dir=tmp_path / "one", progress=False,
                 item_concurrency=2)
    await runner.run(items)
    assert sorted(seen.values()) == [0, 1, 2, 3, 4] and seen[items[0].item_id] == 0
    seen.clear()
    judge = _BatchJudge(Spy(make_vlm("offline", max_concurrency=2), out_dir=tmp_path / "worker", progress=False,
                            item_concurrency=2))
    await judge.judge(items[:3], lambda record: None)
    await judge.judge(items[3:], lambda record: None)
    assert sorted(seen.values()) == [0, 1, 2, 3, 4] and seen[items[3].item_id] >= 3
