"""Shutting down without losing answers.

On SIGTERM the listening socket closes first (aiohttp), then requests in flight get up to
`shutdown_grace` to finish. Past that deadline none is simply cut: the slot queue is closed, so
every queued request gets a 503 with Retry-After, and every request still running is cancelled
and answers for itself (proxy/front.py): an open stream ends with an SSE error event, anything
else with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from aiohttp import web

log = logging.getLogger("proxy")

ABORT_WAIT = 5.0  # seconds the cancelled requests get to write their last words
OPEN_STREAM = web.RequestKey("open_stream", web.StreamResponse)  # set once a stream starts
DRAIN: web.AppKey[Drain] = web.AppKey("drain")


class Drain:
    def __init__(self) -> None:
        self.aborting = False
        self.at_deadline: list[Callable[[], None]] = []  # e.g. closing the slot queue
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Around every request (the front middleware), so shutdown can wait for it or cut it
        cleanly wherever it is: in authentication, the queue, or the model."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    async def wait(self, grace: float) -> None:
        """Let in-flight requests finish for up to `grace` seconds; then call the at_deadline
        hooks and cancel the rest."""
        if self._tasks:
            log.info("waiting up to %.0fs for %d requests", grace, len(self._tasks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
            return
        self.aborting = True
        for hook in self.at_deadline:
            hook()
        log.warning("shutdown grace of %.0fs is over: ending %d requests with an error",
                    grace, len(self._tasks))
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), ABORT_WAIT)
