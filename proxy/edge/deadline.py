"""A deadline on a task's waits that costs no timer per wait.

A stream waits thousands of times a second (for the model's next bytes, for the client to take
them); `asyncio.timeout` re-arms a timer for each wait, and that was a large share of what a
relayed chunk cost. Here a wait only notes when it began; one timer, armed when none is pending,
checks on the waits when it fires and re-arms itself for the one in progress. A wait that
outlasts its limit is cancelled and raises TimeoutError, as under asyncio.timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
EARLY = 0.001  # seconds


class Deadline:
    """For waits of the current task, one at a time; close() (or `with`) when done."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a Deadline belongs to a task"
        self._task = task
        self._since: float | None = None  # when the wait in progress began
        self._limit = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the pending timer fires
        self._expired = False

    async def wait(self, limit: float, awaitable: Awaitable[T]) -> T:
        """awaitable's result, or TimeoutError if it takes longer than limit seconds."""
        now = self._loop.time()
        self._since, self._limit, self._expired = now, limit, False
        cancelling = self._task.cancelling()
        if self._timer is None or self._due > now + limit:
            self._arm(now + limit)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                # Ours only if nobody else cancelled the task too (asyncio.timeout's rule).
                if self._task.uncancel() <= cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._since = None
            if self._expired:  # it expired, but the wait ended otherwise: take the cancel back
                self._expired = False
                self._task.uncancel()

    def close(self) -> None:
        """No more waits: the timer goes (it would keep the task alive until it fired)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = when
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # between waits: the next wait arms the timer again
        due = self._since + self._limit
        # uvloop fires timers on whole milliseconds, so up to one early: that is the deadline
        # (re-arming for the rest would spin until the clock caught up).
        if self._loop.time() + EARLY >= due:
            self._expired = True
            self._task.cancel()
        else:
            self._arm(due)
