"""The relay on its own, with its dependencies given explicitly (no appliance around it), against
the fast fake upstream: whole and streamed answers, failover, deadlines, upstream errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from auth.principal import Principal
from config.catalog import ModelEntry
from proxy.api.failures import to_openai
from proxy.api.routes import MAX_BODY
from proxy.edge.ids import REQUEST_ID
from proxy.upstream.backends import Backend, State
from proxy.upstream.call import ModelCall
from proxy.upstream.catalog import CatalogModel
from proxy.upstream.relay import Relay, Timeouts
from quota.slots import FairQueue
from tests.conftest import Fake
from tests.kit.helpers import free_port

CHAT = "/v1/chat/completions"
FAST = Timeouts(connect=1.0, first_byte=2.0, idle=2.0)


def body(stream: bool = False, **fake: object) -> bytes:
    return orjson.dumps({"model": "fake-model", "messages": [], "stream": stream, "fake": fake})


@pytest.fixture
async def relay_via() -> AsyncIterator[Callable[..., object]]:
    """Answer one request through a Relay with the given backends and timeouts; returns the
    response as a client sees it, and what the relay reported unreachable."""
    runners: list[web.AppRunner] = []
    client = aiohttp.ClientSession()

    async def serve(backends: list[Backend], raw: bytes, stream: bool,
                    timeouts: Timeouts = FAST) -> tuple[int, bytes, list[str]]:
        down: list[str] = []
        relay = Relay(client, timeouts, unreachable=lambda b, why: down.append(b.name))

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                request[REQUEST_ID] = "rid-1"
                model = CatalogModel(ModelEntry("m"), backends, FairQueue(0, 0, 1.0))
                call = ModelCall(request, Principal("user:t", "jwt"), CHAT, stream, model,
                                 backends)
                return await relay(call, raw)
            except Exception as exc:
                error = to_openai(exc, request)
                assert error is not None, exc
                return error.response()

        app = web.Application()
        app[MAX_BODY] = 1024
        app.router.add_post(CHAT, handler)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}{CHAT}", data=raw) as resp:
                return resp.status, await resp.read(), down

    yield serve
    await client.close()
    for runner in runners:
        await runner.cleanup()


def backend(url: str, name: str = "up") -> Backend:
    return Backend(name, url, state=State.READY)


async def test_a_whole_answer_passes_through(relay_via, fake: Fake) -> None:
    status, raw, down = await relay_via([backend(fake.url)], body(), False)
    assert status == 200 and orjson.loads(raw)["choices"][0]["message"]["content"] == "hello"
    assert down == [] and fake.record.headers[-1]["X-Request-Id"] == "rid-1"


async def test_a_stream_passes_through_to_done(relay_via, fake: Fake) -> None:
    status, raw, _ = await relay_via([backend(fake.url)], body(True, chunks=3), True)
    events = [e for e in raw.split(b"\n\n") if e]
    assert status == 200 and len(events) == 4 and events[-1] == b"data: [DONE]"


async def test_an_unreachable_backend_is_reported_and_the_next_one_answers(relay_via,
                                                                          fake: Fake) -> None:
    dead = backend(f"http://127.0.0.1:{free_port()}", "dead")
    status, _, down = await relay_via([dead, backend(fake.url)], body(), False)
    assert status == 200 and down == ["dead"]


async def test_no_backend_reachable_is_502(relay_via) -> None:
    dead = backend(f"http://127.0.0.1:{free_port()}", "dead")
    status, raw, down = await relay_via([dead], body(), False)
    assert status == 502 and orjson.loads(raw)["error"]["code"] == "upstream_unreachable"
    assert down == ["dead"]


async def test_deadlines(relay_via, fake: Fake) -> None:
    short = Timeouts(connect=1.0, first_byte=0.3, idle=0.3)
    status, raw, _ = await relay_via([backend(fake.url)], body(ttfb=2), False, short)
    assert status == 504 and orjson.loads(raw)["error"]["code"] == "upstream_timeout"
    status, raw, _ = await relay_via([backend(fake.url)], body(True, chunks=5, stall_after=2),
                                     True, short)
    events = [e for e in raw.split(b"\n\n") if e]
    assert status == 200 and len(events) == 3  # two chunks, then the error event
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"


async def test_upstream_errors_come_back_in_openai_shape(relay_via, fake: Fake) -> None:
    raw_error = body(raw="<html>oops</html>", status=500, content_type="text/html")
    status, raw, _ = await relay_via([backend(fake.url)], raw_error, False)
    error = orjson.loads(raw)["error"]
    assert status == 500 and error["message"] == "Model server error: <html>oops</html>"
    assert set(error) == {"message", "type", "param", "code"}
