"""The lazily moved deadline the relay puts on a stream's waits: it must time out exactly the wait
that outlasts its limit, counted from that wait's start, and nothing else."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.edge.deadline import Deadline


async def test_a_wait_in_time_returns_its_value_and_close_drops_the_timer() -> None:
    with Deadline() as deadline:
        assert await deadline.wait(1.0, asyncio.sleep(0.01, "done")) == "done"
        assert deadline._timer is not None  # armed once, kept for the next waits
    assert deadline._timer is None


async def test_a_wait_past_its_limit_raises_timeout_and_leaves_the_task_uncancelled() -> None:
    started = time.monotonic()
    with Deadline() as deadline, pytest.raises(TimeoutError):
        await deadline.wait(0.1, asyncio.sleep(5))
    assert 0.1 <= time.monotonic() - started < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # and no cancellation is still pending for it


async def test_the_limit_counts_from_the_start_of_the_wait_that_outlasts_it() -> None:
    with Deadline() as deadline:
        for _ in range(8):  # 0.4 s of quick waits: the timer fires between or during them
            await deadline.wait(0.15, asyncio.sleep(0.05))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await deadline.wait(0.15, asyncio.sleep(5))
        assert 0.15 <= time.monotonic() - started < 0.6


async def test_time_between_waits_does_not_count() -> None:
    with Deadline() as deadline:
        await deadline.wait(0.1, asyncio.sleep(0))
        await asyncio.sleep(0.3)  # outside any wait: three limits long
        assert await deadline.wait(0.1, asyncio.sleep(0.01, "fine")) == "fine"


async def test_a_shorter_limit_after_a_longer_one_is_kept() -> None:
    with Deadline() as deadline:
        await deadline.wait(30.0, asyncio.sleep(0))  # the timer is set 30 s out
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await deadline.wait(0.1, asyncio.sleep(5))
        assert time.monotonic() - started < 1.0


async def test_someone_elses_cancel_stays_a_cancel() -> None:
    async def waiter() -> None:
        with Deadline() as deadline:
            await deadline.wait(5.0, asyncio.sleep(5))

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_cancel_at_the_moment_it_expires_is_still_a_cancel() -> None:
    """Both at once (the client left just as the deadline passed): the handler must see the
    cancellation, as under asyncio.timeout, not a timeout it would answer."""
    async def waiter() -> None:
        with Deadline() as deadline:
            expire = deadline._check

            def expire_and_cancel() -> None:  # someone else's cancel in the same instant
                expire()
                task.cancel()

            deadline._check = expire_and_cancel  # type: ignore[method-assign]
            await deadline.wait(0.05, asyncio.sleep(5))

    task = asyncio.create_task(waiter())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_an_expiry_the_wait_swallowed_leaves_no_cancel_behind() -> None:
    async def swallows() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    with Deadline() as deadline:
        assert await deadline.wait(0.05, swallows()) == "swallowed"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation is delivered later either


def test_under_uvloop_an_expiry_costs_one_check_or_two() -> None:
    """uvloop fires timers on whole milliseconds, a little early: the deadline must not spin
    re-arming itself until its clock catches up."""
    import uvloop

    checks = 0

    class Counted(Deadline):
        def _check(self) -> None:
            nonlocal checks
            checks += 1
            super()._check()

    async def main() -> None:
        with Counted() as deadline:
            for _ in range(5):
                await deadline.wait(0.1234567, asyncio.sleep(0.01))
            with pytest.raises(TimeoutError):
                await deadline.wait(0.1234567, asyncio.sleep(5))

    uvloop.run(main())
    assert checks <= 3, checks
