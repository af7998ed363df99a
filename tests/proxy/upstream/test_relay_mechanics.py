"""Relay mechanics against the fast fake upstream: streaming, timeouts, errors, disconnects."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.server import Running
from proxy.upstream.usage import UsageMeter
from tests.conftest import Fake, ProxyFactory
from tests.kit.helpers import eventually

CHAT = "/v1/chat/completions"


def chat(fake: dict | None = None, stream: bool = True) -> dict:
    body: dict = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                  "stream": stream}
    if fake is not None:
        body["fake"] = fake
    return body


async def read_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    raw = await resp.read()
    return [e for e in raw.split(b"\n\n") if e.strip()]


async def test_stream_chunks_arrive_as_produced(fake_proxy: Running) -> None:
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        async with client.post(fake_proxy.base_url + CHAT,
                               json=chat({"chunks": 5, "gap": 0.2})) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for _ in resp.content.iter_any():
                arrivals.append(time.monotonic() - started)
    # The first token is there long before the last one was produced (not buffered to the end).
    assert arrivals[0] < 0.15
    assert arrivals[-1] > 0.8


async def test_stream_passes_bytes_through_and_ends_with_done(fake_proxy: Running) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(fake_proxy.base_url + CHAT, json=chat({"chunks": 4})) as resp:
            events = await read_events(resp)
    assert len(events) == 5 and events[-1] == b"data: [DONE]"
    first = orjson.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["content"] == "tok0 "


async def test_idle_gap_ends_stream_with_error_event(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", idle_timeout=0.3)
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        async with client.post(proxy.base_url + CHAT,
                               json=chat({"chunks": 5, "stall_after": 2})) as resp:
            events = await read_events(resp)
    assert time.monotonic() - started < 2
    assert len(events) == 3
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout" and error["type"] == "server_error"
    # The stalled upstream request was abandoned, not left running.
    await eventually(lambda: fake.record.cancelled == 1, 1, "the upstream request to be dropped")


async def test_a_stream_broken_off_upstream_ends_with_an_error_event(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """What came before the break is relayed whole, then an OpenAI error event, then the end."""
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    events, error = await stream_ending_in_error(proxy, {"chunks": 5, "break_after": 3})
    assert len(events) == 4
    assert [orjson.loads(e.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
            for e in events[:3]] == ["tok0 ", "tok1 ", "tok2 "]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"


async def test_an_internal_error_mid_stream_ends_it_with_an_error_event(
    make_proxy: ProxyFactory, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect of ours after a stream has started must still end it, not leave the client
    waiting (the response can no longer be a 500)."""
    seen = []

    def failing(self: UsageMeter, chunk: bytes) -> bytes:
        seen.append(chunk)
        if len(seen) == 2:
            raise RuntimeError("a defect")
        return chunk

    monkeypatch.setattr(UsageMeter, "filter", failing)
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    events, error = await stream_ending_in_error(proxy, {"chunks": 5, "gap": 0.05})
    assert len(events) == 2
    assert error["code"] == "internal_error" and "a defect" not in events[-1].decode()


async def stream_ending_in_error(proxy: Running, fake_options: dict[str, Any]
                                 ) -> tuple[list[bytes], dict[str, Any]]:
    """A stream's events and the error its last one carries; a client that is never answered
    fails the test within 10 s instead of hanging it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        async with client.post(proxy.base_url + CHAT, json=chat(fake_options)) as resp:
            assert resp.status == 200
            events = await read_events(resp)
    return events, orjson.loads(events[-1].removeprefix(b"data: "))["error"]


async def test_first_byte_timeout_is_504(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", first_byte_timeout=0.3)
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.base_url + CHAT, json=chat({"ttfb": 3}, stream=False)) as r:
            body = await r.json()
    assert r.status == 504
    assert body["error"]["code"] == "upstream_timeout"


async def test_whole_request_cap_applies_mid_stream(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", request_timeout=0.5)
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.base_url + CHAT, json=chat({"chunks": 50, "gap": 0.05})) as r:
            events = await read_events(r)
    assert 3 < len(events) < 50
    assert b'"error"' in events[-1]


async def test_upstream_that_goes_away(fake_proxy: Running, fake: Fake) -> None:
    await fake.runner.cleanup()
    async with aiohttp.ClientSession() as client:
        async with client.post(fake_proxy.base_url + CHAT, json=chat(stream=False)) as r:
            first = await r.json()
        assert r.status == 502 and first["error"]["code"] == "upstream_unreachable"
        # Now known to be down: later calls are refused at once, and health says so.
        async with client.post(fake_proxy.base_url + CHAT, json=chat(stream=False)) as r:
            second = await r.json()
        assert r.status == 503 and r.headers["Retry-After"]
        assert second["error"]["code"] == "backend_unavailable"
        async with client.get(fake_proxy.base_url + "/health") as r:
            assert r.status == 503 and (await r.json())["status"] == "down"


@pytest.mark.parametrize(
    ("fake_args", "status", "message"),
    [
        ({"raw": "<html>oops</html>", "status": 500, "content_type": "text/html"}, 500,
         "Model server error: <html>oops</html>"),
        ({"raw": '{"error": {"message": "Loading model", "type": "unavailable_error"}}',
          "status": 503, "content_type": "application/json"}, 503, "Loading model"),
    ],
)
async def test_upstream_errors_come_back_in_openai_shape(
    fake_proxy: Running, fake_args: dict, status: int, message: str
) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(fake_proxy.base_url + CHAT, json=chat(fake_args, False)) as r:
            body = await r.json()
    assert r.status == status
    assert body["error"]["message"] == message
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 503:
        assert r.headers["Retry-After"]


async def test_client_disconnect_closes_upstream_at_once(fake_proxy: Running, fake: Fake) -> None:
    async with aiohttp.ClientSession() as client:
        resp = await client.post(fake_proxy.base_url + CHAT,
                                 json=chat({"chunks": 1000, "gap": 0.05}))
        await resp.content.readany()
        assert fake.record.open_streams == 1
        left = time.monotonic()
        resp.close()
    await eventually(lambda: fake.record.cancelled, 1, "the upstream stream to be closed")
    assert fake.record.cancelled == 1
    assert fake.record.cancelled_at[0] - left < 0.5
    assert fake.record.open_streams == 0


async def test_more_than_100_concurrent_streams_are_not_capped(
    fake_proxy: Running, fake: Fake
) -> None:
    async def one(client: aiohttp.ClientSession) -> int:
        async with client.post(fake_proxy.base_url + CHAT,
                               json=chat({"chunks": 3, "gap": 0.5})) as resp:
            return len(await read_events(resp))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        counts = await asyncio.gather(*(one(client) for _ in range(150)))
    assert counts == [4] * 150
    assert fake.record.max_open_streams == 150


async def test_request_id_is_kept_forwarded_or_made(fake_proxy: Running, fake: Fake) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(fake_proxy.base_url + CHAT, json=chat(stream=False),
                               headers={"X-Request-Id": "my-trace-42"}) as r:
            assert r.headers["X-Request-Id"] == "my-trace-42"
        assert fake.record.headers[-1]["X-Request-Id"] == "my-trace-42"
        async with client.post(fake_proxy.base_url + CHAT, json=chat(stream=False),
                               headers={"X-Request-Id": "bad id\twith spaces"}) as r:
            made = r.headers["X-Request-Id"]
        assert made != "bad id\twith spaces" and len(made) == 32
        async with client.get(fake_proxy.base_url + "/nope") as r:
            assert len(r.headers["X-Request-Id"]) == 32


async def test_a_cookie_set_by_the_upstream_goes_to_no_one(make_proxy: ProxyFactory,
                                                          fake: Fake) -> None:
    """The relay is one client to the model server for every user: a cookie it was given
    must not be sent back on anyone's later request, nor handed to the caller. (By a host
    name: a cookie jar ignores cookies from a bare IP address anyway.)"""
    proxy = await make_proxy(upstreams=[fake.url.replace("127.0.0.1", "localhost")],
                             auth="disabled")
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.base_url + CHAT,
                               json=chat({"set_cookie": "session=alice"}, stream=False)) as r:
            assert r.status == 200 and "Set-Cookie" not in r.headers
        async with client.post(proxy.base_url + CHAT, json=chat(stream=False)) as r:
            assert r.status == 200
    assert len(fake.record.headers) == 2 and "Cookie" not in fake.record.headers[-1]


async def test_streams_keep_the_upstream_connection_unless_it_is_llama_cpp(
    fake_proxy: Running, fake: Fake
) -> None:
    """llama-server drops its connection after a stream, so a stream to it asks for the close;
    any other model server keeps it (learned from its answers and its health checks' `Server`
    header; the close until then)."""
    async def stream() -> str:
        async with client.post(fake_proxy.base_url + CHAT, json=chat({"chunks": 2})) as r:
            assert r.status == 200 and b"[DONE]" in await r.read()
        return fake.record.headers[-1].get("Connection", "keep-alive")

    async with aiohttp.ClientSession() as client:
        assert await stream() == "keep-alive"  # its health check answered as aiohttp
        async with client.post(fake_proxy.base_url + CHAT,
                               json=chat({"server": "llama.cpp"}, stream=False)) as r:
            assert r.status == 200
        assert await stream() == "close"


async def test_upstream_key_is_sent_and_models_are_listed(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled",
                             upstream_api_key="upstream-secret")
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.base_url + "/v1/models") as r:
            models = await r.json()
        async with client.post(proxy.base_url + CHAT, json=chat(stream=False)) as r:
            assert r.status == 200
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert fake.record.headers[-1]["Authorization"] == "Bearer upstream-secret"
