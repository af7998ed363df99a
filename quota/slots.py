"""A bounded, fair queue in front of the model's slots.

llama-server queues without bound and never says it is busy. Here at most `slots` requests reach
the model at once; the others wait in a queue that takes turns across principals, so one caller
with 32 parallel requests cannot starve another with one. A full queue, a long wait or a shutdown
is a `Busy` error (the edge answers 503 with Retry-After) instead of an endless wait.

Every await is a place where a waiter can be cancelled (its client left, its wait ran out) in the
same loop turn as a slot is handed to it, so hand-off skips waiters that are already done, as
asyncio.Semaphore does, and a waiter that gave up just after being granted passes the slot on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

BUSY_RETRY_AFTER = 2
SHUTTING_DOWN = "The appliance is shutting down; retry shortly"


class Busy(Exception):
    """No slot for this request; `code` says why (the edge turns it into a 503)."""

    code = "busy"
    retry_after = BUSY_RETRY_AFTER


class QueueFull(Busy):
    code = "queue_full"


class QueueTimeout(Busy):
    code = "queue_timeout"


class QueueClosed(Busy):
    code = "shutting_down"
    retry_after = 5  # a restart takes a few seconds


class SlotQueue(Protocol):
    """What the edge needs of a slot queue: this process's FairQueue, or (in an extra --workers
    process) the first process's, borrowed through proxy/access/shared_slots.py."""

    slots: int

    def slot(self, who: str) -> AbstractAsyncContextManager[None]: ...

    async def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class FairQueue:
    def __init__(self, slots: int, max_waiting: int, timeout: float) -> None:
        self.slots = slots
        self.free = slots
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.waiting = 0  # futures still in the queues (each removed, and counted off, once)
        self.closed = False
        self._queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self.waited = 0  # requests that had to wait, and for how long in all (for metrics)
        self.wait_seconds = 0.0

    @asynccontextmanager
    async def slot(self, who: str) -> AsyncIterator[None]:
        """Hold one of the model's slots (callers skip this when slots <= 0: no queue)."""
        await self.acquire(who)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, who: str) -> None:
        if self.closed:
            raise QueueClosed(SHUTTING_DOWN)
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"The model is busy ({self.waiting} requests waiting); retry shortly")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(who)
        if queue is None:
            queue = self._queues[who] = collections.deque()
            self._turns.append(who)
        queue.append(future)
        self.waiting += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # granted in the same instant we gave up: pass it on
            else:
                future.cancel()
                self._forget(who, future)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(f"The model stayed busy for {self.timeout:g}s; retry "
                                   "shortly") from None
            raise
        finally:
            self.waited += 1
            self.wait_seconds += time.monotonic() - started

    def release(self) -> None:
        """Hand the slot to the next live waiter, taking turns across principals, or free it."""
        while self._turns:
            future = self._pop()
            if future is not None:
                future.set_result(None)
                return
        self.free += 1

    def close(self) -> None:
        """Shutting down: every waiter, and every later request, gets QueueClosed."""
        self.closed = True
        while self._turns:
            future = self._pop()
            if future is not None:
                future.set_exception(QueueClosed(SHUTTING_DOWN))

    def _pop(self) -> asyncio.Future[None] | None:
        """Take the first waiter of the principal whose turn it is, who then goes to the back;
        None if that waiter was cancelled this very turn (the principal keeps its turn)."""
        who = self._turns[0]
        queue = self._queues[who]
        future = queue.popleft()
        self.waiting -= 1
        live = not future.done()
        if not queue:
            del self._queues[who]
            self._turns.popleft()
        elif live:
            self._turns.rotate(-1)
        return future if live else None

    def _forget(self, who: str, future: asyncio.Future[None]) -> None:
        queue = self._queues.get(who)
        if queue is not None and future in queue:
            queue.remove(future)
            self.waiting -= 1
            if not queue:
                del self._queues[who]
                self._turns.remove(who)

    async def stats(self) -> dict[str, Any]:
        return {"slots": self.slots, "free": self.free, "waiting": self.waiting,
                "max_waiting": self.max_waiting, "waited": self.waited,
                "wait_seconds": round(self.wait_seconds, 3)}
