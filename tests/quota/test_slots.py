"""The fair slot queue under races: cancellations in the same loop turn as a hand-off, at random
points, many times; the counters must come back exact and no slot may be lost. (Clients hanging
up in the queue over HTTP: tests/proxy/access/test_limits.py.)"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from quota.slots import FairQueue, QueueClosed, QueueFull, QueueTimeout


async def settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("release_first", [False, True],
                         ids=["cancelled-then-freed", "granted-then-cancelled"])
async def test_a_hand_off_and_a_hang_up_in_the_same_turn_lose_nothing(release_first: bool
                                                                     ) -> None:
    queue = FairQueue(1, 10, 60)
    await queue.acquire("holder")
    waiter = asyncio.create_task(queue.acquire("b"))
    behind = asyncio.create_task(queue.acquire("c"))
    await settle_loop()
    assert queue.waiting == 2
    if release_first:  # granted to b, which gives up before it could run: it passes it on
        queue.release()
        waiter.cancel()
    else:  # b's client hangs up in the same loop turn as the holder finishes: b is skipped
        waiter.cancel()
        queue.release()
    await settle_loop()
    assert waiter.cancelled()
    assert behind.done() and behind.exception() is None  # the slot went to the next one
    assert (queue.free, queue.waiting) == (0, 0)
    queue.release()
    assert (queue.free, queue.waiting) == (1, 0)


async def test_random_cancellations_never_lose_a_slot() -> None:
    rng = random.Random(8)
    queue = FairQueue(1, 1000, 60)
    served = 0

    async def client(who: str, cancel_after: float | None) -> None:
        nonlocal served
        work = asyncio.create_task(use(who))
        if cancel_after is None:
            await work
            return
        await asyncio.sleep(cancel_after)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)

    async def use(who: str) -> None:
        nonlocal served
        async with queue.slot(who):
            served += 1
            await asyncio.sleep(rng.uniform(0, 0.01))

    for _ in range(5):
        clients = [client(f"p{i % 7}", rng.uniform(0, 0.3) if i % 2 else None)
                   for i in range(50)]
        await asyncio.gather(*clients)
        assert (queue.free, queue.waiting) == (1, 0)
    started = time.monotonic()
    async with queue.slot("fresh"):
        assert time.monotonic() - started < 0.01  # at once, not after a timeout
    assert (queue.free, queue.waiting) == (1, 0)
    assert served >= 125  # every client that did not cancel, and some that did


async def test_full_queue_wait_limit_and_close() -> None:
    queue = FairQueue(1, 1, 0.2)
    await queue.acquire("a")
    waiter = asyncio.create_task(queue.acquire("b"))
    await settle_loop()
    with pytest.raises(QueueFull):
        await queue.acquire("c")
    with pytest.raises(QueueTimeout):
        await waiter
    assert queue.waiting == 0
    waiter = asyncio.create_task(queue.acquire("b"))
    await settle_loop()
    queue.close()
    with pytest.raises(QueueClosed):
        await waiter
    with pytest.raises(QueueClosed):
        await queue.acquire("d")
    queue.release()
    assert (queue.free, queue.waiting) == (1, 0)
