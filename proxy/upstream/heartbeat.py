"""Keep a waiting stream alive through tunnels and proxies that cut idle connections.

A streamed request can wait a long time before its first token: in the admission queue, then
while the model reads the prompt. Tunnels, CDNs and reverse proxies drop a response that sends
nothing for a while (nginx's proxy_read_timeout, Cloudflare at ~100 s), answering the client
504 although its answer is coming. So once a stream has waited `interval` seconds, its SSE
response is started and an SSE comment (`: keep-alive`, ignored by every SSE client) is sent
every `interval` seconds until the first real chunk. Waits shorter than that change nothing:
errors still get their own status. After the response has started, an error can only be an
SSE error event (front middleware: proxy/front.py).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.edge.connection import reset
from proxy.edge.drain import OPEN_STREAM

log = logging.getLogger("proxy.relay")

KEEP_ALIVE = b": keep-alive\n\n"


def sse_response() -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # tell any proxy in front of us not to buffer either
    })


class Heartbeat:
    """Around the wait of one streamed request; `response` is the started stream, if any."""

    def __init__(self, request: web.Request, interval: float, write_timeout: float) -> None:
        self.request = request
        self.interval = interval
        self.write_timeout = write_timeout
        self.response: web.StreamResponse | None = None
        # Most streams get their first token before the first beat is due: until then a timer
        # stands in for the beat's task (a task per stream cost a wake-up and a cancellation).
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one of the beat or the relay starts the response

    async def __aenter__(self) -> Heartbeat:
        if self.interval > 0:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._wake)
        return self

    def _wake(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._beat())

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> web.StreamResponse:
        """The stream's response, started (by the beat already, or now)."""
        async with self._lock:
            if self.response is None:
                response = sse_response()
                await response.prepare(self.request)
                self.response = self.request[OPEN_STREAM] = response
            return self.response

    @property
    def beating(self) -> bool:
        """Whether stop() has anything to stop (a stream checks before each chunk)."""
        return self._timer is not None or self._task is not None

    async def stop(self) -> None:
        """No more comments (before the first real chunk is written). A comment being written
        is whole in the transport's buffer already: cancelling only stops waiting on it."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # The beat's own end; a cancel aimed at the caller (a shutdown) goes on.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _beat(self) -> None:
        try:
            while True:  # the first beat is due now
                async with asyncio.timeout(self.write_timeout):
                    response = await self.start()
                    await response.write(KEEP_ALIVE)
                await asyncio.sleep(self.interval)
        except TimeoutError:  # the client stopped reading while it waited
            log.warning("the client of a waiting stream stopped reading; connection cut")
            reset(self.request.transport)
        except ConnectionResetError:
            pass  # the client left; its handler is cancelled and stops the wait
