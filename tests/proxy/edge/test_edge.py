"""The edge from an attacker's side: slowloris, connection floods, malformed HTTP, bodies that
never finish, idle keep-alive sockets and clients that stop reading a stream."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.edge.connection import LINGER, EdgeLimits, EdgeServer
from tests.conftest import Fake, ProxyFactory
from tests.kit.helpers import Appliance, eventually, wait_until

CHAT = "/v1/chat/completions"


def established(sock: socket.socket) -> bool:
    """TCP's own state (the first byte of struct tcp_info): 1 is ESTABLISHED."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def read_answer(reader: asyncio.StreamReader, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too: the
    kernel then drops what was not read yet)."""
    got = b""
    async with asyncio.timeout(limit):
        try:
            while chunk := await reader.read(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


@pytest.fixture
def appliance_for(tmp_path: Path, fake: Fake):
    started: list[Appliance] = []

    def make(*args: str) -> Appliance:
        app = Appliance(tmp_path / f"a{len(started)}", "--upstream", fake.url, "--auth",
                        "disabled", *args)
        started.append(app)
        return app

    yield make
    for app in started:
        app.stop()


async def test_slowloris_is_cut_at_the_header_deadline_while_others_are_served(
    appliance_for, fake: Fake
) -> None:
    app = appliance_for("--header-timeout", "2")
    await asyncio.to_thread(app.wait_ready)
    baseline = open_fds(app.proc.pid)
    sockets = [await asyncio.open_connection("127.0.0.1", app.port) for _ in range(200)]
    for _, writer in sockets:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for _ in range(20):  # a byte every half second: never a whole header block
            await asyncio.sleep(0.5)
            if writer.is_closing():
                return
            writer.write(b"X")

    trickling = [asyncio.create_task(trickle(w)) for _, w in sockets]
    await eventually(lambda: open_fds(app.proc.pid) >= baseline + 190, 5, "the attack to land")
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.post(app.base + CHAT, json={"model": "fake-model", "messages": []}) as r:
            assert r.status == 200
        assert time.monotonic() - started < 1.0  # a normal client, at normal latency
    # Each is closed by the deadline (read_answer returns only then), with a 408 in OpenAI's
    # shape unless a trickled byte crossed the close and the reset dropped it.
    answers = await asyncio.gather(*(read_answer(reader) for reader, _ in sockets))
    assert sum(1 for a in answers if a) > 150
    for answer in filter(None, answers):
        status, body = status_and_json(answer)
        assert status == 408 and body["error"]["code"] == "header_timeout"
    for task in trickling:
        task.cancel()
    for _, writer in sockets:
        writer.close()
    await eventually(lambda: open_fds(app.proc.pid) <= baseline + 2, 5,
                     "the descriptors to return to their baseline")


@pytest.mark.parametrize(
    ("request_bytes", "status", "echo"),
    [
        (b"GARBAGE\r\n\r\n", 400, b"GARBAGE"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"aaaa"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 9000 + b"\r\n\r\n", 431,
         b"BBBB"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n", 431, b"X-H9"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
         + b"A" * 10_000_000 + b"\r\n\r\n", 431, b"AAAA"),
    ],
    ids=["bad-request-line", "long-url", "big-header", "10k-headers", "10MB-token"],
)
async def test_malformed_http_is_refused_in_openai_shape_without_echo(
    appliance_for, request_bytes: bytes, status: int, echo: bytes
) -> None:
    app = appliance_for()
    await asyncio.to_thread(app.wait_ready)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(request_bytes)
    try:
        await writer.drain()
    except ConnectionError:
        pass  # it may hang up before the whole 10 MB is in
    answer = await read_answer(reader)
    writer.close()
    got, body = status_and_json(answer)
    assert got == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert echo not in answer
    head = answer.partition(b"\r\n\r\n")[0]
    assert b"Server: llama-proxy" in head and b"aiohttp" not in head
    await asyncio.to_thread(wait_until, lambda: "refused a malformed request" in app.log, 5,
                            "the refusal to be logged")
    assert "Traceback" not in app.log and "ERROR" not in app.log


async def test_a_body_that_never_finishes_is_cut_at_the_body_deadline(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", body_timeout=1.0)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messa")
    started = time.monotonic()
    answer = await read_answer(reader)  # ends: the connection is closed after the answer
    writer.close()
    status, body = status_and_json(answer)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert 0.9 < time.monotonic() - started < 1.5 + LINGER  # the answer, then a short linger
    assert fake.record.requests == 0


async def test_an_idle_keep_alive_connection_is_closed(make_proxy: ProxyFactory,
                                                       fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", keepalive_timeout=1.0)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    started = time.monotonic()
    assert await read_answer(reader, 5) == b""  # then nothing more, and closed
    assert 0.5 < time.monotonic() - started < 3
    writer.close()


async def test_connections_past_the_total_cap_are_refused_at_once(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", max_connections=5)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await asyncio.sleep(0.1)  # let the server see all five before the sixth
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    status, body = status_and_json(await read_answer(reader))
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    assert time.monotonic() - started < 0.5
    writer.close()
    for _, w in held:
        w.close()
    async with aiohttp.ClientSession() as http:  # room again once they are gone
        await eventually(lambda: _health(http, proxy.base_url), 3, "a connection to be taken")


async def _health(http: aiohttp.ClientSession, base: str) -> bool:
    try:
        async with http.get(base + "/health") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def test_the_per_client_cap_counts_addresses_and_spares_loopback() -> None:
    server = EdgeServer.__new__(EdgeServer)  # only the counting, without a loop
    server._connections = {}  # type: ignore[attr-defined]
    server.edge, server.by_peer = EdgeLimits(max_connections_per_client=2), {}

    def admit(peer: str) -> bool:
        return server.admit(server.key_of(peer))

    assert [admit("203.0.113.5") for _ in range(3)] == [True, True, False]
    assert admit("198.51.100.7")  # another client is not affected
    server.forget("203.0.113.5")
    assert admit("203.0.113.5")  # one left, one may come
    assert all(admit("127.0.0.1") for _ in range(10))  # a local tunnel: total cap only
    assert all(admit("::1") for _ in range(10))
    assert all(admit("::ffff:127.0.0.1") for _ in range(10))  # dual-stack listener
    assert server.key_of("64:ff9b::cb00:7105") == "203.0.113.5"  # IPv4 behind NAT64
    # An IPv6 client is its /64: rotating through its own network escapes nothing.
    assert [admit(f"2001:db8:1:2::{n:x}") for n in range(1, 4)] == [True, True, False]
    assert server.key_of("2001:db8:1:2::99") == "2001:db8:1:2::/64"
    assert admit("2001:db8:1:3::1")  # the next /64 is someone else
    server.edge = EdgeLimits(max_connections_per_client=2, ipv6_prefix=128)
    assert server.key_of("2001:db8:1:2::99") == "2001:db8:1:2::99"


def _first_non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_one_client_address_cannot_take_every_connection(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    address = _first_non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    proxy = await make_proxy(upstreams=[fake.url], host="0.0.0.0",
                             max_connections_per_client=3)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    held = [await asyncio.open_connection(address, port) for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(address, port)
    status, body = status_and_json(await read_answer(reader))
    assert status == 503 and body["error"]["code"] == "too_many_connections"
    writer.close()
    async with aiohttp.ClientSession() as http:  # a loopback client is still served
        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200
    for _, w in held:
        w.close()


@pytest.mark.parametrize("chunks", [1_000_000, 3000], ids=["endless", "ends-while-blocked"])
async def test_a_reader_that_never_reads_loses_its_stream_and_the_slot_comes_back(
    make_proxy: ProxyFactory, fake: Fake, chunks: int
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", admission_slots=1,
                             client_write_timeout=1.0, queue_timeout=30)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stalled, ("127.0.0.1", port))
    body = json.dumps({"model": "fake-model", "messages": [], "stream": True,
                       "fake": {"chunks": chunks, "gap": 0}}).encode()
    stalled.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await eventually(lambda: fake.record.open_streams == 1, 5, "the stream to start")
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:  # queued behind the stalled stream ...
        async with http.post(proxy.base_url + CHAT,
                             json={"model": "fake-model", "messages": []}) as resp:
            assert resp.status == 200
    waited = time.monotonic() - started
    assert 0.9 < waited < 1.0 + 3, waited  # ... served once the write deadline cut the reader
    assert not established(stalled)  # reset, not left for the kernel to keep sending to
    stalled.close()


async def test_a_whole_answer_nobody_reads_is_cut_at_the_write_deadline(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", client_write_timeout=1.0)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stalled, ("127.0.0.1", port))
    body = json.dumps({"model": "fake-model", "messages": [],
                       "fake": {"raw_size": 4_000_000, "content_type": "application/json"}})
    stalled.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body.encode())

    def answer_started() -> bool:
        try:
            return stalled.recv(16, socket.MSG_PEEK).startswith(b"HTTP/1.1 200")
        except BlockingIOError:
            return False

    await eventually(answer_started, 5, "the answer to start")
    started = time.monotonic()
    await eventually(lambda: not established(stalled), 8, "the unread answer to be cut")
    cut = time.monotonic() - started
    assert 0.5 < cut < 1.0 + 3, cut  # at the 1 s write deadline, not at some other limit
    stalled.close()


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", max_body_bytes=1024)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 10000000000\r\n\r\n")
    started = time.monotonic()
    status, body = status_and_json(await read_answer(reader))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 1.0 + LINGER
    writer.close()


async def test_a_half_closing_client_of_a_cheap_request_or_an_error_gets_its_answer(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    """A health check that sends its request and shuts down writing is answered; so is a
    malformed request. Only a POST (work for the model) is taken for a client that left."""
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    port = int(proxy.base_url.rsplit(":", 1)[1])
    answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", half_close=True)
    assert answer.startswith(b"HTTP/1.1 200") and b'"status"' in answer
    answer = await _exchange(port, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", half_close=True)
    assert answer.split(b" ", 2)[1] == b"400", answer[:100]
    body = json.dumps({"model": "fake-model", "messages": [], "fake": {"ttfb": 0.5}}).encode()
    assert await _exchange(port, _post(CHAT, body), half_close=True) == b""  # it left
    await eventually(lambda: fake.record.cancelled == 1 or fake.record.requests == 0, 5,
                     "the abandoned request to stop")


async def test_with_answer_half_close_a_client_that_half_closes_gets_its_answer(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", client_half_close="answer")
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write_eof()  # shutdown(SHUT_WR): nothing more to say, waiting for the answer
    answer = await read_answer(reader)
    assert answer.startswith(b"HTTP/1.1 200") and b'"status"' in answer
    writer.close()


async def test_paths_cannot_forge_log_lines_and_refusals_do_not_flood_the_log(
    appliance_for
) -> None:
    app = appliance_for("--max-connections", "3")
    await asyncio.to_thread(app.wait_ready)
    forged = "2026-11-23 18:00:00,000 ERROR proxy.auth[1]: admin key accepted"
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    path = "/v1/%0a" + forged.replace(" ", "%20") + "%1b[31m"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await read_answer(reader)
    writer.close()
    held = [await asyncio.open_connection("127.0.0.1", app.port) for _ in range(3)]
    await asyncio.sleep(0.2)
    for _ in range(40):  # forty refusals ...
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        await read_answer(r)
        w.close()
    for _, w in held:
        w.close()
    await asyncio.to_thread(wait_until, lambda: "%0A2026-11-23" in app.log
                            or "%0a2026-11-23" in app.log, 5, "the request's log line")
    assert f"\n{forged}" not in app.log and "\x1b" not in app.log
    assert app.log.count("too many open connections") <= 2  # ... one line, not forty


async def _exchange(port: int, request: bytes, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if half_close:
        writer.write_eof()
    answer = await read_answer(reader)
    writer.close()
    return answer


def _post(path: str, body: bytes, *extra: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            % path.encode() + b"".join(h + b"\r\n" for h in extra)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_a_compressed_body_is_refused_not_decoded(make_proxy: ProxyFactory, fake: Fake,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")
    port = int(proxy.base_url.rsplit(":", 1)[1])
    for path, expected in ((CHAT, 415), ("/nowhere", 404)):
        for coding in (b"gzip", b"deflate"):
            answer = await _exchange(port, _post(path, b"not gzip at all",
                                                 b"Content-Encoding: " + coding,
                                                 b"Connection: close"))
            status, body = status_and_json(answer)
            assert status == expected, answer
    assert body["error"]["code"] == "not_found"
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]


async def test_an_unread_body_does_not_start_the_header_deadline(make_proxy: ProxyFactory,
                                                                 fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], header_timeout=1.0, keepalive_timeout=5.0)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/nowhere", b"x" * 300_000))  # answered 404 without reading it
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    with pytest.raises(TimeoutError):  # nothing more: no 408 for a request never begun
        async with asyncio.timeout(2.5):
            extra = await reader.read(100)
            assert not extra, extra  # a close is fine; an unasked answer is not
            await asyncio.sleep(10)
    writer.close()


async def test_with_answer_half_close_a_client_closing_right_after_its_body_gets_the_answer(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", client_half_close="answer")
    port = int(proxy.base_url.rsplit(":", 1)[1])
    body = json.dumps({"model": "fake-model", "messages": []}).encode()
    for _ in range(5):
        answer = await _exchange(port, _post(CHAT, body), half_close=True)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def test_expect_is_answered_by_the_appliance_not_echoed(make_proxy: ProxyFactory,
                                                              fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], max_body_bytes=1024)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: <script>X"
                                   b"</script>\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"<script>" not in answer
    # Nobody is asked to send a body that will be refused: no 100 Continue, the refusal first.
    for extra in ((), (b"Authorization: Bearer sk-nope",)):
        answer = await _exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                       b"Expect: 100-continue\r\nContent-Type: application/json"
                                       b"\r\n" + b"".join(h + b"\r\n" for h in extra)
                                 + b"Content-Length: 8000000000\r\n\r\n")
        assert b"100 Continue" not in answer
        assert answer.split(b" ", 2)[1] in (b"401", b"413"), answer[:100]


async def test_headers_past_64_kib_in_all_are_refused(make_proxy: ProxyFactory,
                                                      fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url])
    port = int(proxy.base_url.rsplit(":", 1)[1])
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))  # unfinished
    status, body = status_and_json(await _exchange(port, b"GET /health HTTP/1.1\r\n" + many))
    assert status == 431 and body["error"]["code"] == "headers_too_large"


async def test_a_steady_reader_of_a_large_answer_is_not_cut(make_proxy: ProxyFactory,
                                                            fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled", client_write_timeout=1.0)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    size = 1_500_000
    body = json.dumps({"model": "fake-model", "messages": [],
                       "fake": {"raw_size": size, "content_type": "application/json"}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.sendall(_post(CHAT, body.encode(), b"Connection: close"))

    def read_slowly() -> int:  # about 300 KB/s: five seconds, five write deadlines
        got = 0
        while chunk := sock.recv(16384):
            got += len(chunk)
            time.sleep(0.05)
        return got

    got = await asyncio.to_thread(read_slowly)
    sock.close()
    assert got > size


async def test_refusals_carry_their_own_request_ids(make_proxy: ProxyFactory,
                                                    fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], header_timeout=0.5)
    port = int(proxy.base_url.rsplit(":", 1)[1])
    ids = set()
    for _ in range(2):
        answer = await _exchange(port, b"GET /health HTTP/1.1\r\nHost")  # never finished
        assert answer.startswith(b"HTTP/1.1 408")
        ids.add(answer.split(b"X-Request-Id: ")[1].split(b"\r\n")[0])
    assert len(ids) == 2
