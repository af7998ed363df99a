"""A client that leaves: closed normally (a FIN, what every client does on a timeout or a cancel)
or reset, at every stage of its request. Its work stops at once (the model server's connection
is closed, its queue place and lease are given up), the access line says 499 `disconnect=gone`,
and it is charged only what the model did before the cut. Run on uvloop (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from typing import Any

import aiohttp
import openai
import pytest

from proxy.access.limits import prompt_tokens
from proxy.server import Running
from proxy.upstream.pool import CATALOG
from tests.conftest import Fake, Llama, ProxyFactory, token_for
from tests.kit.fake_upstream import chat_body
from tests.kit.helpers import eventually
from tests.kit.limits import charged, leases
from tests.kit.metrics import scrape

CHAT = "/v1/chat/completions"
HOW = ("fin", "reset")
NOTICED = 0.5  # seconds from the close to the model server's connection closing (a busy CI
#                machine; measured from outside it is a few milliseconds)


def request_bytes(body: dict[str, Any], token: str | None = None,
                  length: int | None = None) -> tuple[bytes, bytes]:
    """(the whole request, its body): a Content-Length of `length` claims more than is sent."""
    raw = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    head = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\n" + auth + b"Content-Length: %d\r\n\r\n" % (length or len(raw)))
    return head + raw, raw


async def send(proxy: Running, data: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, data)
    return sock


def leave(sock: socket.socket, how: str) -> float:
    """Close as a client that gives up does: a FIN (shut down, then closed), or a reset."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_WR)
    left = time.monotonic()
    sock.close()
    return left


async def closed_at_once(fake: Fake, left: float, count: int = 1) -> None:
    """The model server saw its `count`th request cut, within NOTICED of the client's close."""
    await eventually(lambda: fake.record.cancelled == count, 5,
                     "the model server's connection closed")
    assert fake.record.cancelled_at[-1] - left < NOTICED


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "proxy.access"  # type: ignore[attr-defined]
            and hasattr(r, "access") and r.access["path"] != "/metrics"]


async def gone_lines(caplog: pytest.LogCaptureFixture, count: int = 1
                     ) -> list[dict[str, Any]]:
    """The access lines of cut requests, once there are `count` of them: each a 499 gone."""
    def cut() -> list[dict[str, Any]] | None:
        lines = [a for a in access_lines(caplog) if a["status"] == 499]
        return lines if len(lines) >= count else None

    lines = await eventually(cut, 5, "the access line of the cut request")
    assert all(a["disconnect"] == "gone" for a in lines)
    return lines


async def gone_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    return (await gone_lines(caplog))[-1]


async def all_back_to_zero(proxy: Running, redis_url: str | None = None,
                           who: str = "") -> None:
    """Nothing left behind: no stream open, the queue empty, every slot and lease free."""
    queue = proxy.app[CATALOG].models[0].queue

    async def idle() -> bool:
        stats = await queue.stats()
        metrics = await scrape(proxy)
        return (stats["waiting"] == 0 and stats["free"] == stats["slots"]
                and metrics.value("llama_proxy_open_streams") == 0
                and (redis_url is None or leases(redis_url, who) == 0))

    await eventually(idle, 3, "the counters to be back to zero")


@pytest.fixture(autouse=True)
def _access(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")


# -- every stage, through the fast fake upstream


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_client_that_leaves_while_the_model_works_stops_it(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture, how: str,
    stream: bool
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    data, _ = request_bytes(chat_body(stream, ttfb=30))
    sock = await send(proxy, data)
    await eventually(lambda: fake.record.in_flight == 1, 5, "the request to reach the model")
    left = leave(sock, how)
    await closed_at_once(fake, left)
    line = await gone_line(caplog)
    assert line["duration_ms"] < 5000
    await all_back_to_zero(proxy)


@pytest.mark.parametrize("how", HOW)
async def test_a_client_that_leaves_mid_stream_stops_it(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    data, _ = request_bytes(chat_body(True, chunks=1000, gap=0.05))
    sock = await send(proxy, data)
    assert b"200 OK" in await asyncio.get_running_loop().sock_recv(sock, 65536)
    left = leave(sock, how)
    await closed_at_once(fake, left)
    await gone_line(caplog)
    await all_back_to_zero(proxy)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_queued_client_that_leaves_gives_up_its_place_at_once(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture, how: str,
    stream: bool
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             sse_keepalive=15)
    queue = proxy.app[CATALOG].models[0].queue
    holder = await send(proxy, request_bytes(chat_body(False, ttfb=30))[0])
    await eventually(lambda: fake.record.in_flight == 1, 5, "the slot to be taken")
    waiter = await send(proxy, request_bytes(chat_body(stream))[0])

    async def waiting() -> bool:
        return (await queue.stats())["waiting"] == 1

    await eventually(waiting, 5, "the second request to queue")
    left = leave(waiter, how)

    async def gave_up() -> bool:
        return (await queue.stats())["waiting"] == 0

    await eventually(gave_up, 5, "the queue place to be given up")
    assert time.monotonic() - left < NOTICED + 0.5  # long before the first keep-alive (15 s)
    line = await gone_line(caplog)
    assert "queue_ms" not in line  # it never had a slot
    leave(holder, how)
    await eventually(lambda: fake.record.cancelled == 1, 5, "the holder's request to stop")
    assert fake.record.requests == 1  # the one that left never reached the model
    await all_back_to_zero(proxy)


@pytest.mark.parametrize("how", HOW)
async def test_a_client_that_leaves_while_sending_its_body_is_let_go(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    data, _ = request_bytes(chat_body(), length=10_000)  # claims more than it sends
    sock = await send(proxy, data)
    await asyncio.sleep(0.2)  # the handler is reading the body
    leave(sock, how)
    line = await gone_line(caplog)
    assert line["duration_ms"] < 5000
    assert fake.record.requests == 0


# -- what a cut request is charged


async def settled(redis_url: str, who: str) -> int:
    """The caller's charge once nothing of theirs is in flight (a settlement releases the
    lease and turns the reservation into the charge in one step)."""
    await eventually(lambda: leases(redis_url, who) == 0, 5, "every request settled")
    return charged(redis_url, who)


async def test_a_cut_request_is_charged_what_the_model_did_before_the_cut(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=1_000_000, limit_concurrency=4,
                             admission_slots=1)
    token, who = token_for(proxy, "pat"), "pat"

    # Cut before its first token: its prompt, nothing more.
    data, raw = request_bytes(chat_body(True, ttfb=30), token)
    sock = await send(proxy, data)
    await eventually(lambda: fake.record.in_flight == 1, 5, "the request to reach the model")
    leave(sock, "fin")
    assert await settled(redis_url, who) == prompt_tokens(raw)
    paid = charged(redis_url, who)

    # Cut while queued: nothing (it never reached the model).
    holder = await send(proxy, request_bytes(chat_body(False, ttfb=30), token)[0])
    await eventually(lambda: fake.record.in_flight == 1, 5, "the slot to be taken")
    with_holder = charged(redis_url, who)  # its reservation
    waiter = await send(proxy, request_bytes(chat_body(False), token)[0])
    await eventually(lambda: leases(redis_url, who) == 2, 5, "the second request admitted")
    leave(waiter, "fin")
    await eventually(lambda: leases(redis_url, who) == 1, 5, "the queued request settled")
    assert charged(redis_url, who) == with_holder
    leave(holder, "fin")
    paid = await settled(redis_url, who)

    # Cut mid-stream: the prompt and about a token an event read from the model.
    data, raw = request_bytes(chat_body(True, chunks=1000, gap=0.02), token)
    sock = await send(proxy, data)
    await eventually(lambda: fake.record.open_streams == 1, 5, "the stream to start")
    began = time.monotonic()
    await asyncio.sleep(0.5)
    leave(sock, "fin")
    ran = time.monotonic() - began + NOTICED  # an event each 20 ms at most, while it ran
    cost = await settled(redis_url, who) - paid
    assert prompt_tokens(raw) + 5 < cost <= prompt_tokens(raw) + 3 + ran / 0.02
    await all_back_to_zero(proxy, redis_url, who)


async def test_a_whole_answer_from_llama_cpp_is_streamed_from_it_so_a_cut_stops_it(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], limit_tpm=1_000_000, limit_concurrency=4,
                             health_interval=3600)
    token, who = token_for(proxy, "quin"), "quin"
    headers = {"Authorization": f"Bearer {token}"}
    # A server not known to be llama.cpp is asked for a whole answer: a cut cannot tell how
    # far the model got, so the reservation stands.
    data, raw = request_bytes({**chat_body(False, ttfb=30), "max_tokens": 300}, token)
    sock = await send(proxy, data)
    await eventually(lambda: fake.record.in_flight == 1, 5, "the request to reach the model")
    leave(sock, "fin")
    paid = await settled(redis_url, who)
    assert paid == prompt_tokens(raw) + 300
    async with aiohttp.ClientSession(headers=headers) as http:
        # An answer that says it comes from llama.cpp ...
        async with http.post(proxy.base_url + CHAT, json=chat_body(server="llama.cpp")) as r:
            assert r.status == 200 and fake.record.bodies[-1]["stream"] is False
        # ... and from then on whole answers are streamed from it and assembled.
        async with http.post(proxy.base_url + CHAT, json=chat_body(server="llama.cpp")) as r:
            answer = await r.json()
    assert fake.record.bodies[-1]["stream"] is True
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant",
                                               "content": "tok0 tok1 tok2 "}
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    paid = await settled(redis_url, who)
    # Cut after half a second: the model's stream is closed at once, and the caller pays its
    # prompt and about a token an event read.
    data, raw = request_bytes(chat_body(False, server="llama.cpp", chunks=1000, gap=0.02),
                              token)
    sock = await send(proxy, data)
    await eventually(lambda: fake.record.open_streams == 1, 5, "the model's stream to start")
    began = time.monotonic()
    await asyncio.sleep(0.5)
    left = leave(sock, "fin")
    await closed_at_once(fake, left, count=2)
    ran = time.monotonic() - began + NOTICED
    cost = await settled(redis_url, who) - paid
    assert prompt_tokens(raw) + 5 < cost <= prompt_tokens(raw) + 3 + ran / 0.02


# -- through the real model


async def busy_slots(llama: Llama) -> int:
    """llama-server's own count of slots at work (asked without blocking the loop the
    in-process appliance runs on)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{llama.url}/slots",
                            headers={"Authorization": f"Bearer {llama.key}"}) as answer:
            return sum(1 for slot in await answer.json() if slot.get("is_processing"))


async def slots_busy(llama: Llama, count: int) -> bool:
    return await busy_slots(llama) == count


LONG = {"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
        "max_tokens": 500, "ignore_eos": True}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_real_model_stops_when_its_client_leaves(
    make_proxy: ProxyFactory, llama: Llama, redis_url: str, caplog: pytest.LogCaptureFixture,
    how: str, stream: bool
) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=1_000_000, admission_slots=1)
    who = f"real-{how}-{stream}"
    token = token_for(proxy, who)
    data, raw = request_bytes({**LONG, "model": llama.model, "stream": stream}, token)
    sock = await send(proxy, data)
    await asyncio.sleep(1.0)
    assert await busy_slots(llama) == 1
    left = leave(sock, how)
    await eventually(lambda: slots_busy(llama, 0), 3, "llama-server to free the slot")
    freed = time.monotonic() - left
    line = await gone_line(caplog)
    assert 0 < line["completion_tokens"] < 400  # what it made in a second, not the 500 asked
    await eventually(lambda: charged(redis_url, who) == prompt_tokens(raw)
                     + line["completion_tokens"], 3, "the cut request charged what it made")
    assert freed < NOTICED + 0.5
    await all_back_to_zero(proxy)


@pytest.mark.parametrize("how", HOW)
async def test_a_client_queued_for_the_real_model_that_leaves_costs_nothing(
    make_proxy: ProxyFactory, llama: Llama, redis_url: str, caplog: pytest.LogCaptureFixture,
    how: str
) -> None:
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             limit_tpm=1_000_000, limit_concurrency=4, admission_slots=1)
    who = f"queued-{how}"
    token = token_for(proxy, who)
    holder = await send(proxy, request_bytes({**LONG, "model": llama.model}, token)[0])
    await eventually(lambda: slots_busy(llama, 1), 5, "the slot to be taken")
    with_holder = charged(redis_url, who)
    waiter = await send(proxy, request_bytes({**LONG, "model": llama.model, "stream": True},
                                             token)[0])
    await eventually(lambda: leases(redis_url, who) == 2, 5, "the second request admitted")
    leave(waiter, how)
    line = await gone_line(caplog)
    assert "queue_ms" not in line and "completion_tokens" not in line  # never reached it
    await eventually(lambda: leases(redis_url, who) == 1, 3, "its lease given back")
    assert charged(redis_url, who) == with_holder  # its reservation returned whole
    leave(holder, how)
    await eventually(lambda: slots_busy(llama, 0), 3, "llama-server to free the slot")
    await all_back_to_zero(proxy, redis_url, who)


async def test_an_sdk_timeout_and_its_retries_each_free_the_slot_at_once(
    make_proxy: ProxyFactory, llama: Llama, caplog: pytest.LogCaptureFixture
) -> None:
    """The openai SDK retries a timed-out request twice: against one slot, each attempt is
    cut when the SDK gives up on it, so the next (and the next caller) gets the slot at once."""
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key,
                             admission_slots=1)
    client = openai.AsyncOpenAI(base_url=proxy.base_url + "/v1", api_key=token_for(proxy),
                                timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model=llama.model, messages=LONG["messages"], max_tokens=500,
            extra_body={"ignore_eos": True})
    attempts = await gone_lines(caplog, count=3)
    cut = attempts[-1]
    assert len(attempts) == 3  # the first try and the SDK's two retries
    for attempt in attempts:  # cut when the SDK gave up on it, not when the model finished
        assert 1.4 < attempt["duration_ms"] / 1000 < 1.5 + 2 * NOTICED, attempt
    assert cut["queue_ms"] < 500  # each retry found the slot free
    started = time.monotonic()
    answer = await client.chat.completions.create(
        model=llama.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].message.content is not None
    # The next caller did not wait behind the cut ones (700 tokens each: several seconds).
    assert time.monotonic() - started < 3.0
    await client.close()
    await eventually(lambda: slots_busy(llama, 0), 3, "llama-server's slots to be free")
    await all_back_to_zero(proxy)


async def test_these_tests_run_on_uvloop_as_the_appliance_does() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_a_whole_answer_assembled_from_the_stream_is_llama_servers_own(
    make_proxy: ProxyFactory, llama: Llama
) -> None:
    """What the appliance assembles from llama-server's stream is the answer llama-server would
    have sent whole: same text, finish reason, usage and fields."""
    proxy = await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key, auth="disabled")
    assert proxy.app[CATALOG].backends()[0].llama_cpp is True  # so its answers are assembled
    ask = {"model": llama.model, "max_tokens": 24, "temperature": 0, "seed": 7,
           "messages": [{"role": "user", "content": "Name three colours."}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(llama.url + CHAT, json=ask,
                             headers={"Authorization": f"Bearer {llama.key}"}) as r:
            direct = await r.json()
        async with http.post(proxy.base_url + CHAT, json=ask) as r:
            assert r.status == 200
            relayed = await r.json()
        text = {"model": llama.model, "prompt": "Once upon a time", "max_tokens": 12,
                "temperature": 0, "seed": 7}
        async with http.post(llama.url + "/v1/completions", json=text,
                             headers={"Authorization": f"Bearer {llama.key}"}) as r:
            direct_text = await r.json()
        async with http.post(proxy.base_url + "/v1/completions", json=text) as r:
            relayed_text = await r.json()
    assert relayed["choices"][0]["message"] == direct["choices"][0]["message"]
    assert relayed["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]
    assert relayed["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
    assert relayed["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert set(direct) - set(relayed) <= {"timings"} and relayed["object"] == "chat.completion"
    assert relayed_text["choices"][0]["text"] == direct_text["choices"][0]["text"]
    assert relayed_text["object"] == direct_text["object"]
    assert relayed_text["usage"]["completion_tokens"] == direct_text["usage"]["completion_tokens"]
