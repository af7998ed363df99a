"""The keep-alive comments of a waiting stream: none (and no response started) for a wait shorter
than the interval, one every interval after that, none after stop()."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.edge.drain import OPEN_STREAM
from proxy.upstream.heartbeat import KEEP_ALIVE, Heartbeat

INTERVAL = 0.1


async def waiting(request: web.Request) -> web.StreamResponse:
    """Waits `wait` seconds under a heartbeat, then `after` more with it stopped, then answers."""
    async with Heartbeat(request, INTERVAL, 5.0) as beat:
        await asyncio.sleep(float(request.query["wait"]))
        await beat.stop()
        assert not beat.beating
        await asyncio.sleep(float(request.query.get("after", "0")))
    if beat.response is None:
        return web.Response(text="whole")
    assert request[OPEN_STREAM] is beat.response
    await beat.response.write(b"data: answer\n\n")
    await beat.response.write_eof()
    return beat.response


async def get(aiohttp_client, query: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_get("/", waiting)
    client: TestClient = await aiohttp_client(app)
    async with client.get("/?" + query) as resp:
        assert resp.status == 200
        return resp.content_type, await resp.text()


async def test_a_short_wait_starts_nothing(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    # and stop() takes the pending beat back: nothing comes in the 0.2 s after it
    assert await get(aiohttp_client, "wait=0.02&after=0.2") == ("text/plain", "whole")


async def test_a_long_wait_sends_a_comment_every_interval(aiohttp_client  # type: ignore[no-untyped-def]
                                                          ) -> None:
    kind, text = await get(aiohttp_client, "wait=0.55")
    assert kind == "text/event-stream"
    assert 3 <= text.count(KEEP_ALIVE.decode()) <= 5  # at 0.1, 0.2 ... 0.5 s; late on a busy box
    assert text.endswith("data: answer\n\n")


async def test_no_comment_after_stop(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    kind, text = await get(aiohttp_client, "wait=0.15&after=0.3")
    assert kind == "text/event-stream"
    # Only the beat due at 0.1 s can come before 0.15 s (timers fire in order), none after.
    assert text.count(KEEP_ALIVE.decode()) == 1


async def test_stop_passes_on_a_cancel_aimed_at_its_caller() -> None:
    """A shutdown that cancels a handler while stop() waits for a beat being written must not
    be swallowed with the beat's own cancellation."""
    finishing = asyncio.Event()

    async def writing() -> None:  # a beat whose write takes a moment to end when cancelled
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            finishing.set()
            await asyncio.sleep(0.1)
            raise

    beat = Heartbeat(None, INTERVAL, 5.0)  # type: ignore[arg-type]  # the request is not used
    beat._task = asyncio.create_task(writing())
    await asyncio.sleep(0)
    handler = asyncio.create_task(beat.stop())
    await finishing.wait()
    handler.cancel()  # the shutdown
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    assert handler.cancelled()


async def test_stop_alone_ends_quietly() -> None:
    beat = Heartbeat(None, INTERVAL, 5.0)  # type: ignore[arg-type]
    beat._task = asyncio.create_task(asyncio.sleep(5))
    await asyncio.sleep(0)
    await beat.stop()  # the beat's cancellation stays inside
    assert not beat.beating
