"""A bounded, fair queue in front of the model's slots.

llama-server queues without bound and never says it is busy. Here at most `slots` requests reach
the model at once; the others wait in a queue that takes turns across principals, so one caller
with 32 parallel requests cannot starve another with one. A full queue or a long wait is a fast 503
with Retry-After instead of an endless wait.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import OpenAIError

BUSY_RETRY_AFTER = "2"


class FairQueue:
    def __init__(self, slots: int, max_waiting: int, timeout: float) -> None:
        self.slots = slots
        self.free = slots
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.waiting = 0
        self._queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self.waited = 0  # requests that had to wait, and for how long in all (for metrics)
        self.wait_seconds = 0.0

    @asynccontextmanager
    async def slot(self, who: str) -> AsyncIterator[None]:
        """Hold one of the model's slots (callers skip this when slots <= 0: no queue)."""
        await self._acquire(who)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, who: str) -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        if self.waiting >= self.max_waiting:
            raise OpenAIError(503, f"The model is busy ({self.waiting} requests waiting); "
                              "retry shortly", code="queue_full",
                              headers={"Retry-After": BUSY_RETRY_AFTER})
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(who, collections.deque())
        if not queue:
            self._turns.append(who)
        queue.append(future)
        self.waiting += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self._release()  # granted in the same instant we gave up: pass it on
            else:
                future.cancel()
                self._forget(who, future)
            if isinstance(exc, TimeoutError):
                raise OpenAIError(503, f"The model stayed busy for {self.timeout:.0f}s; retry "
                                  "shortly", code="queue_timeout",
                                  headers={"Retry-After": BUSY_RETRY_AFTER}) from None
            raise
        finally:
            self.waited += 1
            self.wait_seconds += time.monotonic() - started

    def _forget(self, who: str, future: asyncio.Future[None]) -> None:
        queue = self._queues.get(who)
        if queue is not None and future in queue:
            queue.remove(future)
            self.waiting -= 1
            if not queue:
                del self._queues[who]
                self._turns.remove(who)

    def _release(self) -> None:
        """Hand the slot to the next principal in turn, or free it."""
        while self._turns:
            who = self._turns.popleft()
            queue = self._queues[who]
            future = queue.popleft()
            self.waiting -= 1
            if queue:
                self._turns.append(who)
            else:
                del self._queues[who]
            future.set_result(None)
            return
        self.free += 1
