"""The keep-alive comments of a waiting stream: none (and no response started) for a wait shorter
than the interval, one every interval after that, none after stop()."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.drain import OPEN_STREAM
from proxy.heartbeat import KEEP_ALIVE, Heartbeat

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
    kind, text = await get(aiohttp_client, "wait=0.35")
    assert kind == "text/event-stream"
    assert 2 <= text.count(KEEP_ALIVE.decode()) <= 4  # at 0.1, 0.2, 0.3 s, give or take a tick
    assert text.endswith("data: answer\n\n")


async def test_no_comment_after_stop(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    kind, text = await get(aiohttp_client, "wait=0.15&after=0.3")
    assert kind == "text/event-stream"
    assert 1 <= text.count(KEEP_ALIVE.decode()) <= 2  # none in the 0.3 s after stop()
