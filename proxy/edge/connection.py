"""The connection layer, below the middlewares: what aiohttp does not guard against by itself.

- A deadline for a request's headers: a client that sends them a byte at a time (slowloris) is
  answered 408 and closed after `header_timeout`; an idle keep-alive connection is closed after
  `keepalive_timeout` (aiohttp's own timer).
- Caps on open connections, in all and per client address, with the excess refused at once with
  a 503 (connections from loopback, a tunnel agent or proxy on this host, count toward the total
  only: every client behind it shares that address).
- Requests aiohttp's parser refuses (a bad request line, an oversized header, too many headers)
  answered in OpenAI's shape with the right status (400, 414, 431), never echoing the request,
  logged as one WARNING line without a traceback; a client that leaves is an INFO line.
- A client that closes its side of the connection while its POST runs has left (what every
  HTTP client does on a timeout or a cancel): the connection closes, the request's handler is
  cancelled at once (its queue place, slot and upstream connection go with it) and the access
  line says 499, as nginx does by default. Cheap requests (GET, HEAD, ...) are still answered,
  and `answer_half_close` answers every one.

aiohttp builds its protocol objects itself, so this module depends on aiohttp's request handler
and server internals (aiohttp is pinned in requirements.txt); tests/proxy/edge/test_aiohttp_hooks.py
names each one and fails first if an upgrade changes it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from config.loader import is_loopback
from proxy.edge.forwarded import TrustedProxies, address_group
from proxy.edge.ids import new_id
from proxy.errors import error_body, error_type

log = logging.getLogger("proxy.edge")
QUIET_FOR = 10.0  # seconds between two log lines about the same kind of refusal

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


# After answering a request whose body was not read whole, aiohttp reads and drops the rest for a
# while so the client sees the answer rather than a reset; 10 s by default, which would let each
# such client hold its connection that much longer.
LINGER = 2.0
# Headers in all, per request: aiohttp caps each line (8 KiB) and their number (128), which
# still lets every connection park a megabyte of half-sent headers.
MAX_HEAD_BYTES = 64 * 1024
# Answers larger than this are watched for progress while they are written out.
BIG_ANSWER = 256 * 1024
# Requests whose client is taken to have left when it half-closes (the others are answered).
MAKES_WORK = frozenset({"POST", "PUT", "PATCH"})
# Bytes a write may add and still never wait: well under the transport's high-water mark (64
# KiB), past which the writer pauses and a write waits for the client.
AT_ONCE = 16 * 1024


def goes_out_at_once(protocol: RequestHandler, size: int) -> bool:
    """Whether writing `size` more bytes cannot wait: the writer is not paused, and the
    transport's buffer stays under AT_ONCE (such a write needs no deadline)."""
    transport = protocol.transport
    return (transport is not None and not protocol.writing_paused
            and transport.get_write_buffer_size() + size <= AT_ONCE)


class Progress:
    """Moves a write deadline on while the answer moves (the transport's buffer changes:
    filled by the writer, emptied as the client takes bytes), checked four times per
    deadline (at most once a second)."""

    def __init__(self, transport: asyncio.Transport | None, deadline: asyncio.Timeout,
                 limit: float) -> None:
        self.transport, self.deadline, self.limit = transport, deadline, limit
        self.loop = asyncio.get_running_loop()
        self.left = transport.get_write_buffer_size() if transport else 0
        self.every = min(1.0, limit / 4)
        self.handle = self.loop.call_later(self.every, self._check)

    def _check(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        left = self.transport.get_write_buffer_size()
        if left != self.left:
            self.deadline.reschedule(self.loop.time() + self.limit)
        self.left = left
        self.handle = self.loop.call_later(self.every, self._check)

    def stop(self) -> None:
        self.handle.cancel()


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout: float = 10.0
    max_connections: int = 2048  # 0: no cap
    max_connections_per_client: int = 64  # 0: no cap; loopback peers are not counted
    write_timeout: float = 30.0  # longest wait for a client to take the rest of an answer
    # The kernel's send buffer per client connection (0: its own, which grows to megabytes):
    # what a client that stops reading can absorb before writes block and the stream's write
    # deadline starts, so it bounds how long such a client keeps the model.
    send_buffer: int = 65536
    max_body: int = 8 * 1024 * 1024  # a body larger than this is not asked for (Expect)
    # A client that shuts down writing still waits for its answer (rare), rather than having
    # left (every client that times out or is cancelled; the default).
    answer_half_close: bool = False
    # Trusted proxies and tunnels carry many clients each: like loopback, total cap only.
    proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    ipv6_prefix: int = 64  # IPv6 peers are counted by their /64 (one subscriber's network)


def _refusal(status: int, reason: str, message: str, code: str,
             headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer, written straight to the socket, then the connection closes."""
    body = orjson.dumps(error_body(message, error_type(status), code))
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close", "Server: llama-proxy",
             f"X-Request-Id: {new_id()}", *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items()),
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def too_slow() -> bytes:
    return _refusal(408, "Request Timeout", "The request headers did not arrive in time",
                    "header_timeout")


def too_many() -> bytes:
    return _refusal(503, "Service Unavailable", "Too many open connections; retry shortly",
                    "too_many_connections", {"Retry-After": "2"})


def head_too_large() -> bytes:
    return _refusal(431, "Request Header Fields Too Large",
                    "The request headers are too large", "headers_too_large")


class Throttled:
    """Log a kind of event at most once per QUIET_FOR seconds, saying how many were not
    logged: a flood of refusals must not flood the log too."""

    def __init__(self, level: int, message: str, logger: logging.Logger = log) -> None:
        self.level, self.message, self.log = level, message, logger
        self._next = 0.0
        self._quiet = 0

    def __call__(self, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        more = f" (and {self._quiet} more in the last {QUIET_FOR:.0f}s)" if self._quiet else ""
        self.log.log(self.level, self.message + more, *args)
        self._next, self._quiet = now + QUIET_FOR, 0


REFUSED_CONNECTION = Throttled(logging.WARNING, "refused a connection from %s: too many open "
                                                "connections")
HEADERS_TOO_SLOW = Throttled(logging.INFO, "closed a connection whose request headers did not "
                                           "arrive in time")
MALFORMED = Throttled(logging.WARNING, "refused a malformed request from %s: %s (HTTP %d)")
STOPPED_READING = Throttled(logging.WARNING, "cut a connection whose client stopped reading "
                                             "its answer")


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection at once, with what is still unsent: a plain close would leave the
    kernel trying, for minutes, to deliver it to a client that does not read."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class EdgeServer(web.Server):
    """aiohttp's server, counting connections per client address; each connection handled by
    an EdgeHandler."""

    edge: EdgeLimits
    by_peer: dict[str, int]

    def __call__(self) -> RequestHandler:
        return EdgeHandler(self, loop=self._loop, **self._kwargs)

    def key_of(self, peer: str) -> str | None:
        """What a connection from `peer` counts under: its address (an IPv6 one's network),
        or None (loopback, a trusted proxy, no per-client cap: the total cap only)."""
        edge = self.edge
        if (not peer or not edge.max_connections_per_client or is_loopback(peer)
                or peer in edge.proxies):
            return None
        return address_group(peer, edge.ipv6_prefix)

    def admit(self, key: str | None) -> bool:
        """Count a new connection in, or say it is one too many."""
        edge = self.edge
        if edge.max_connections and len(self._connections) >= edge.max_connections:
            return False
        if key is not None:
            if self.by_peer.get(key, 0) >= edge.max_connections_per_client:
                return False
            self.by_peer[key] = self.by_peer.get(key, 0) + 1
        return True

    def forget(self, key: str) -> None:
        count = self.by_peer.get(key)
        if count is not None:
            if count <= 1:
                del self.by_peer[key]
            else:
                self.by_peer[key] = count - 1


class EdgeHandler(RequestHandler):
    __slots__ = ("_answering_eof", "_body", "_counted_peer", "_gone", "_head_bytes",
                 "_header_deadline", "_linger_after", "_parsed_method")

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._counted_peer: str | None = None
        self._header_deadline: asyncio.TimerHandle | None = None
        # An error answer: let the client finish sending, then close (True once lingering).
        self._linger_after = False
        self._gone: asyncio.Future[None] = self._loop.create_future()
        self._body: StreamReader | None = None  # the body of the request being handled
        self._head_bytes = 0  # of a request not yet whole
        self._answering_eof = False
        self._parsed_method = ""  # of the latest request parsed on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        assert isinstance(server, EdgeServer)
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else ""
        key = server.key_of(peer)
        admitted = server.admit(key)  # before this one is counted among the connections
        sock = transport.get_extra_info("socket")
        if server.edge.send_buffer and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server.edge.send_buffer)
        super().connection_made(transport)
        if not admitted:
            REFUSED_CONNECTION(peer)
            self._refuse(too_many())
            return
        self._counted_peer = key

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        server = self._manager
        if self._counted_peer is not None and isinstance(server, EdgeServer):
            server.forget(self._counted_peer)
            self._counted_peer = None
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        body = self._reading_body()  # before the parser takes it: it may end the body
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._disarm()  # a whole request is in: its headers made it in time
            self._head_bytes = 0
            if self._messages:
                message, self._body = self._messages[-1]  # what follows is its body
                self._parsed_method = getattr(message, "method", "")  # a parse error has none
        elif data and not body:  # the start of a request's headers
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._disarm()
                MALFORMED(self._peer(), f"headers over {MAX_HEAD_BYTES} bytes", 431)
                self._refuse(head_too_large())
                return
            server = self._manager
            if self._header_deadline is None and isinstance(server, EdgeServer):
                self._header_deadline = self._loop.call_later(
                    server.edge.header_timeout, self._headers_too_slow)

    def _reading_body(self) -> bool:
        """Bytes now are the rest of a body (read by its handler, or dropped after its
        answer), not a new request: they must not start the header deadline."""
        return self._body is not None and not self._body.is_eof()

    def _peer(self) -> str:
        peername = self.transport.get_extra_info("peername") if self.transport else None
        return peername[0] if isinstance(peername, tuple) else "?"

    async def _handle_request(self, request: BaseRequest, start_time: float | None,
                              request_handler: Callable[[BaseRequest],
                                                        Awaitable[web.StreamResponse]]
                              ) -> tuple[web.StreamResponse, bool]:
        if hdrs.EXPECT in request.headers:
            await self._expect(request)
        return await super()._handle_request(request, start_time, request_handler)

    async def _expect(self, request: BaseRequest) -> None:
        """aiohttp answers Expect itself before any middleware: 100 Continue to anyone
        (a client then sends gigabytes it will be refused), or a plain-text 417 echoing the
        header. Here the header is taken away, and 100 Continue is sent only to a request
        that has a credential and a body within the limit; anyone else gets the refusal
        before sending the body. Other expectations are ignored (RFC 9110 allows it)."""
        expect = request.headers[hdrs.EXPECT]
        headers = CIMultiDict(request.headers)
        del headers[hdrs.EXPECT]
        # No public way to drop a header: the field, and reify's cache of it.
        request._headers = request._cache["headers"] = CIMultiDictProxy(headers)
        server = self._manager
        limit = server.edge.max_body if isinstance(server, EdgeServer) else 0
        size = request.content_length
        if (expect.lower() == "100-continue" and request.version == HttpVersion11
                and size is not None and size <= limit
                and ("Authorization" in headers or "X-API-Key" in headers)):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's own size starts after this

    def eof_received(self) -> bool:
        """The client closed its side. With nothing under way, or an answer lingering, the
        connection simply closes. A request that makes work (a POST: a model call, its body
        being read, queued, waiting for the model, streaming) is abandoned: closing cancels
        its handler at once. A cheap one (a health check, say, whose client sent its request
        and half-closed) and an error answer being written still go out, then the connection
        closes; every request does with answer_half_close. TLS transports close on their own
        whatever this returns. (uvloop may say it twice.)"""
        if self._answering_eof:
            return True
        if self._idle() or self._close or not self._answers_half_close():
            return False  # the transport closes; connection_lost cancels the handler
        self._answering_eof = True
        self.close()
        return True

    def _answers_half_close(self) -> bool:
        if self.transport is None or self.transport.get_extra_info("sslcontext") is not None:
            return False  # returning True would only make asyncio log a warning
        server = self._manager
        if isinstance(server, EdgeServer) and server.edge.answer_half_close:
            return True
        return self._linger_after or self._method() not in MAKES_WORK

    def _method(self) -> str:
        """The method of the request under way: being handled, or parsed and on its way to
        its handler (off the queue, its task not yet started)."""
        request = self._current_request
        return request.method if request is not None else self._parsed_method

    def _idle(self) -> bool:
        """Waiting for the next request, none of it here yet (between taking a request off
        the queue and handling it, this is not idle though nothing is queued or running)."""
        waiting = self._waiter is not None and not self._waiter.done()
        return waiting and not self._messages and not self._request_in_progress

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """Writing the answer out, within the write deadline: a client that does not read a
        large answer must not keep the connection and its buffered answer for ever. The
        deadline counts time without progress: a steady reader of a large answer is not a
        stalled one."""
        server = self._manager
        limit = server.edge.write_timeout if isinstance(server, EdgeServer) else None
        if limit is None or self._goes_out_at_once(resp):
            answered = await super().finish_response(request, resp, start_time)
        else:
            try:
                async with asyncio.timeout(limit) as deadline:
                    watch = None
                    if (resp.content_length or 0) > BIG_ANSWER:
                        watch = Progress(self.transport, deadline, limit)
                    try:
                        answered = await super().finish_response(request, resp, start_time)
                    finally:
                        if watch is not None:
                            watch.stop()
            except TimeoutError:
                STOPPED_READING()
                reset(self.transport)
                return resp, True
        if self._linger_after:
            await self._linger()
        return answered

    def _goes_out_at_once(self, resp: web.StreamResponse) -> bool:
        """A short answer to a client that has taken everything sent before: the socket takes
        it without waiting, so it needs no deadline (a timer each is a cost at thousands of
        requests a second). A client that stopped reading has bytes left in the buffer."""
        size = resp.content_length
        return (size is not None and self.transport is not None
                and self.transport.get_write_buffer_size() == 0 and goes_out_at_once(self, size))

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._idle():  # still waiting for a whole request: its headers came too slowly
            HEADERS_TOO_SLOW()
            self._refuse(too_slow())

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _refuse(self, answer: bytes) -> None:
        """Answer, then close without resetting: what the client still sends is read and
        dropped for a short while, so it gets to read the answer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        self._close = True  # no more requests; data_received drops what comes in
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, self.force_close)

    async def _linger(self) -> None:
        """After an error answer: half-close, drop what the client still sends until it
        closes too or LINGER passes (closing on unread input would reset the connection,
        and the client could lose the answer)."""
        self._close = True
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        await asyncio.wait([self._gone], timeout=LINGER)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        """Errors aiohttp answers itself (its parser's, or one that escaped every middleware):
        OpenAI's shape, nothing of the request echoed, one log line without a traceback."""
        status, text, code = _describe(status, exc)
        self._linger_after = True
        if isinstance(exc, ConnectionError):
            log.info("client went away (%s)", type(exc).__name__)
        else:
            MALFORMED(request.remote, type(exc).__name__ if exc else "error", status)
        response = web.Response(
            status=status, body=orjson.dumps(error_body(
                text, error_type(status), code)),
            content_type="application/json",
            headers={"Server": "llama-proxy", "X-Request-Id": new_id(), **SECURITY_HEADERS})
        response.force_close()
        return response


def _describe(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """The status, message and code for an error aiohttp's parser raised."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        start = line[:4] if isinstance(line, str) else bytes(line[:4]).decode("latin-1")
        if start.startswith(("/", "http", "*")):  # the request line's target, not a header
            return 414, "The request URL is too long", "url_too_long"
        return 431, "A request header is too large", "header_too_large"
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "The request has too many headers", "too_many_headers"
    if status >= 500:
        return 500, "Internal error", "internal_error"
    return 400, "The request is not valid HTTP", "bad_request"


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server is an EdgeServer."""

    def __init__(self, app: web.Application, *, edge: EdgeLimits, **kwargs: Any) -> None:
        # auto_decompress off: a compressed body is refused (proxy/api/routes.py), never inflated
        # or half-decoded by the parser (a bad one raised tracebacks and a 500).
        super().__init__(app, lingering_time=LINGER, auto_decompress=False, **kwargs)
        self.edge = edge

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = EdgeServer  # aiohttp builds it; only how connections are handled
        assert isinstance(server, EdgeServer)  # changes, and what is counted
        server.edge, server.by_peer = self.edge, {}
        return server
