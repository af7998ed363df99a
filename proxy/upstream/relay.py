"""Forward one OpenAI request to a backend and send its answer back, streamed or whole.

Streamed bytes pass through untouched (no per-chunk JSON parsing), written chunk by chunk as they
arrive; when the client leaves, the upstream connection is closed at once so llama-server frees
its slot. Whole answers from llama-server are streamed from it and assembled
(proxy/upstream/assemble.py), so that a client that leaves frees the slot too. The relay gets
everything it uses explicitly (the HTTP client, the timeouts, what to do with an unreachable
backend), so it can be tested on its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import (
    ClientConnectionError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    ServerDisconnectedError,
    TCPConnector,
    web,
)

from proxy.edge.connection import goes_out_at_once, reset
from proxy.edge.deadline import Deadline
from proxy.errors import (
    STATUS_OF_TYPE,
    OpenAIError,
    error_body,
    error_type,
    speaks_anthropic,
)
from proxy.observe.logs import redact
from proxy.observe.outcome import Outcome, outcome_of
from proxy.upstream.assemble import Events, assembly_for, stream_request, with_message_start
from proxy.upstream.backends import (
    Backend,
    ModelLoading,
    State,
    UpstreamBroke,
    UpstreamTimeout,
    UpstreamUnreachable,
    upstream_error,
)
from proxy.upstream.call import ModelCall
from proxy.upstream.heartbeat import Heartbeat
from proxy.upstream.usage import UsageMeter

log = logging.getLogger("proxy.relay")

HTTP_CLIENT = web.AppKey("http_client", ClientSession)  # to the model servers


@dataclass(frozen=True)
class Timeouts:
    connect: float  # to open a connection to a model server
    first_byte: float  # to its response headers (all of a non-streamed answer)
    idle: float  # longest silent gap inside an answer
    request: float = 0.0  # cap on a whole request (0 = none)
    client_write: float = 30.0  # longest wait for a client that stopped reading a stream


class Relay:
    """Sends one OpenAI request to the first backend that answers and relays its answer."""

    def __init__(self, client: ClientSession, timeouts: Timeouts,
                 unreachable: Callable[[Backend, str], None] = lambda backend, why: None
                 ) -> None:
        """unreachable: told about a backend that could not be reached (to mark it down)."""
        self.client = client
        self.timeouts = timeouts
        self.unreachable = unreachable
        # Connect and whole-request caps, built once; the first-byte and idle deadlines are ours.
        self._client_timeout = ClientTimeout(total=timeouts.request or None,
                                             connect=timeouts.connect, sock_read=None)

    async def __call__(self, call: ModelCall, payload: bytes, meter: UsageMeter | None = None,
                       heartbeat: Heartbeat | None = None) -> web.StreamResponse:
        """Send payload (an already-validated JSON body) to the first backend that answers and
        answer the call's request with what it says. heartbeat: keeps a waiting stream alive,
        and may have started its response already."""
        request = call.request
        beat = heartbeat or Heartbeat(request, 0, self.timeouts.client_write)
        try:
            if not call.stream:
                answer = await self.whole(call, payload, meter)
            else:
                upstream = await self.open_stream(call, payload, meter)
                if is_stream(upstream):
                    return await self._stream(request, upstream, meter, call.request_id, beat)
                answer = await self._read(upstream, meter, call.outcome)  # sent whole, unasked
        finally:
            await beat.stop()
        if beat.response is not None:  # the stream started while it waited
            if call.api.typed:
                # A typed API's stream cannot carry a whole answer as one untyped event.
                raise UpstreamBroke("The model server answered a stream request whole")
            return await as_events(answer, beat.response)
        return answer

    async def open_stream(self, call: ModelCall, payload: bytes,
                          meter: UsageMeter | None = None) -> ClientResponse:
        """The model server's response to a streamed request, its headers read."""
        return await self.fetch(call.backends, call.path, payload, True, call.request_id,
                                call.outcome, meter)

    async def whole(self, call: ModelCall, payload: bytes, meter: UsageMeter | None = None
                    ) -> web.Response:
        """A whole answer; a model server's error is raised (ModelRefused). llama-server is asked
        for a stream that is assembled here (proxy/upstream/assemble.py): it stops a stream
        whose reader left, not a whole answer."""
        outcome, path, backends, api = call.outcome, call.path, call.backends, call.api
        assembled = api.assembled
        assemble = assembled and bool(backends) and backends[0].llama_cpp is True
        sent = stream_request(payload, api.stream_usage) if assemble else payload
        # first_byte covers a whole answer, as it does when the server sends it whole.
        deadline = asyncio.get_running_loop().time() + self.timeouts.first_byte
        upstream = await self.fetch(backends, path, sent, assemble, call.request_id, outcome,
                                    meter)
        if assembled and is_stream(upstream):  # asked for, or sent unasked
            try:
                assembly = assembly_for(path, call.request_id, outcome.model)
                async with asyncio.timeout_at(deadline):
                    return await self._read(upstream, meter, outcome, assembly)
            except TimeoutError:
                outcome.upstream_errors.append((outcome.backend, "timeout"))
                raise UpstreamTimeout("The model server did not answer in time") from None
        return await self._read(upstream, meter, outcome)

    async def _read(self, upstream: ClientResponse, meter: UsageMeter | None,
                    outcome: Outcome, assembly: Events | None = None) -> web.Response:
        """All of an answer as one response (a stream put together by `assembly`); how the
        model server failed is noted on the outcome."""
        try:
            if assembly is not None:
                return await self._assembled(upstream, meter, assembly)
            return await self._whole(upstream, meter)
        except (UpstreamTimeout, UpstreamBroke) as exc:
            outcome.upstream_errors.append((outcome.backend, failure_kind(exc)))
            raise

    async def _assembled(self, upstream: ClientResponse, meter: UsageMeter | None,
                         assembly: Events) -> web.Response:
        """A whole answer from a stream. Closing (not releasing) the stream at the end, or when
        the client leaves, drops the connection: llama-server frees the slot at once."""
        try:
            async for events in self.chunks(upstream, meter):
                assembly.feed(events)
            assembly.end()
            if assembly.error is None and not assembly.done:  # ended without saying so
                raise UpstreamBroke("The model server broke off its answer")
        finally:
            upstream.close()
        if assembly.error is not None:  # the model server failed mid-answer
            status = error_status(assembly.error)
            raise ModelRefused(status, openai_fields(status, assembly.error))
        return web.Response(body=orjson.dumps(assembly.answer()), content_type="application/json")

    async def fetch(self, backends: list[Backend], path: str, raw: bytes, stream: bool,
                    request_id: str = "", outcome: Outcome | None = None,
                    meter: UsageMeter | None = None) -> ClientResponse:
        """The first backend's response to raw, its headers read; the caller reads the body
        (read_whole or chunks) and closes it. outcome: told which backend answered, and which
        failed how; meter: told whether the model server was asked for a stream."""
        outcome = outcome if outcome is not None else Outcome()
        for backend in backends:
            outcome.backend = backend.name
            if meter is not None:
                meter.sent(stream)
            try:
                return await self._open(backend, path, raw, stream, request_id)
            except UpstreamUnreachable as exc:
                log.warning("%s: backend %s unreachable: %s", request_id, backend.name, exc)
                outcome.upstream_errors.append((backend.name, "unreachable"))
                self.unreachable(backend, str(exc))
            except UpstreamTimeout:
                outcome.upstream_errors.append((backend.name, "timeout"))
                raise
        raise UpstreamUnreachable

    async def _open(self, backend: Backend, path: str, raw: bytes, stream: bool,
                    request_id: str) -> ClientResponse:
        """POST to the backend and wait for its response headers (the first byte)."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   "X-Request-Id": request_id, **backend.auth_headers()}
        if stream and not backend.streams_keep_alive:
            # llama-server closes the connection after a stream although it said keep-alive;
            # never pool such a connection, or the next request would find it dead.
            headers["Connection"] = "close"
        # A pooled connection may have been closed by the server just after a streamed response
        # (llama-server does this although it advertised keep-alive): retry that once, fresh.
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self.timeouts.first_byte):
                    upstream = await self.client.post(backend.url(path), data=raw,
                                                      headers=headers,
                                                      timeout=self._client_timeout)
                backend.learn(upstream.headers)
                return upstream
            except TimeoutError:
                raise UpstreamTimeout("The model server did not answer in time") from None
            except ClientConnectorError as exc:  # nothing listening: no retry here
                raise UpstreamUnreachable(str(exc) or type(exc).__name__) from exc
            except (ServerDisconnectedError, ClientOSError) as exc:  # a dead pooled connection
                if attempt == 2:
                    raise UpstreamUnreachable(f"connection dropped before an answer ({exc})"
                                              ) from exc
            except ClientConnectionError as exc:
                raise UpstreamUnreachable(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")

    async def read_whole(self, upstream: ClientResponse) -> bytes:
        """All of a non-streamed answer, within the idle deadline (none needed when it all
        came with the headers, as a short answer does)."""
        try:
            if upstream.content.is_eof():
                return await upstream.read()
            async with asyncio.timeout(self.timeouts.idle):
                return await upstream.read()
        except TimeoutError:
            raise UpstreamTimeout("The model server stopped sending its answer") from None
        except ClientError as exc:
            raise UpstreamBroke("The model server broke off its answer") from exc
        finally:
            upstream.release()

    async def _whole(self, upstream: ClientResponse, meter: UsageMeter | None) -> web.Response:
        """A non-streamed answer, read whole; an error is raised as ModelRefused."""
        body = await self.read_whole(upstream)
        status = upstream.status
        if meter is not None and status == 200:
            meter.from_body(body)
        if status >= 400:
            raise ModelRefused.from_body(status, body, upstream.headers.get("Retry-After"))
        return web.Response(status=status, body=body, headers={
            "Content-Type": upstream.headers.get("Content-Type", "application/json")})

    async def _stream(self, request: web.Request, upstream: ClientResponse,
                      meter: UsageMeter | None, request_id: str, beat: Heartbeat
                      ) -> web.StreamResponse:
        """Pass SSE chunks through as they arrive; end with an error event if upstream fails.
        The heartbeat goes on until the first chunk (the model may read a long prompt)."""
        outcome = outcome_of(request)
        response: web.StreamResponse | None = None
        limit = self.timeouts.client_write
        # A client that stops reading must not hold the model: writes block once its buffers
        # are full (that is the backpressure), and a write that waits past client_write cuts
        # it; the error event and the end of the stream too. A write the socket takes at once
        # needs no deadline.
        with Deadline() as stalled:

            async def write(data: bytes) -> None:
                if beat.beating:
                    await beat.stop()
                if goes_out_at_once(request.protocol, len(data)):
                    await stream.write(data)
                else:
                    await stalled.wait(limit, stream.write(data))

            try:
                try:
                    # Set as OPEN_STREAM: a shutdown past its grace ends it with an error event.
                    response = stream = await stalled.wait(limit, beat.start())
                    chunks = self.chunks(upstream, meter)
                    if speaks_anthropic(request.path):
                        chunks = with_message_start(chunks, request_id, outcome.model)
                    async for chunk in chunks:
                        if outcome.first_token is None:
                            outcome.first_token = time.perf_counter() - outcome.started
                        await write(chunk)
                except (UpstreamTimeout, UpstreamBroke) as exc:
                    outcome.upstream_errors.append((outcome.backend, failure_kind(exc)))
                    cause = type(exc.__cause__ or exc).__name__
                    log.warning("%s: %s (%s)", request_id, exc, cause)
                    await write(upstream_error(exc).sse_event(speaks_anthropic(request.path)))
                finally:
                    await beat.stop()
                    # Closing (not releasing) drops the connection: a half-read stream is
                    # abandoned at once, and llama-server closes finished streams itself.
                    upstream.close()
                await stalled.wait(limit, stream.write_eof())
            except TimeoutError:  # only `stalled` raises it here: the others are converted
                outcome.disconnect = "write_timeout"
                log.warning("%s: the client stopped reading for %.0fs; stream cut, model freed",
                            request_id, limit)
                reset(request.transport)
            except ConnectionResetError:
                outcome.disconnect = "gone"
                log.info("%s: client went away mid-stream; closing upstream", request_id)
        return response or web.StreamResponse()  # not started: the client left before it

    async def chunks(self, upstream: ClientResponse, meter: UsageMeter | None
                     ) -> AsyncIterator[bytes]:
        """The upstream's bytes as they come (through the usage meter), each within the idle
        deadline (none needed for bytes that are here already)."""
        content = upstream.content
        try:
            with Deadline() as idle:
                while True:
                    chunk = content.read_nowait()
                    if not chunk:
                        chunk = await idle.wait(self.timeouts.idle, content.readany())
                    if not chunk:
                        if meter is not None and (rest := meter.flush()):
                            yield rest
                        return
                    if meter is not None:
                        chunk = meter.filter(chunk)
                    if chunk:
                        yield chunk
        except TimeoutError:
            raise UpstreamTimeout("The model server went silent") from None
        except ClientError as exc:
            raise UpstreamBroke("The model server broke off the stream") from exc


class ModelRefused(OpenAIError):
    """A model server answered an error: passed on with its status (503: with when to retry),
    its message, type and code kept; rendered in the shape of the client's API."""

    def __init__(self, status: int, error: dict[str, Any], retry_after: str | None = None
                 ) -> None:
        """error: OpenAI's error fields (openai_fields)."""
        headers = {"Retry-After": retry_after or str(ModelLoading.retry_after)} \
            if status == 503 else {}
        super().__init__(status, error["message"], code=error["code"], type=error["type"],
                         param=error["param"], headers=headers)

    @classmethod
    def from_body(cls, status: int, body: bytes, retry_after: str | None = None
                  ) -> ModelRefused:
        """From a model server's error body: its fields kept if it has OpenAI's, the text
        wrapped otherwise."""
        if status in (401, 403):  # about the appliance's key to it, not the client's
            return cls(502, error_body("The model server refused this appliance's credential "
                                       "for it (see its api_key)", "api_error",
                                       "upstream_auth")["error"])
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return cls(status, openai_fields(status, parsed["error"]), retry_after)
        text = redact(body.decode(errors="replace").strip()[:200]) or f"HTTP {status}"
        return cls(status, error_body(f"Model server error: {text}", error_type(status),
                                      "upstream_error")["error"], retry_after)


def openai_fields(status: int, error: dict[str, Any]) -> dict[str, Any]:
    """A model server's error object as OpenAI's fields: message, type, code (a string), param."""
    code = error.get("code")
    return {"message": redact(str(error.get("message") or "Model server error")),
            "type": str(error.get("type") or error_type(status)),
            "code": None if code is None else str(code), "param": error.get("param")}


def error_status(error: dict[str, Any]) -> int:
    """The status an error event stands for: its numeric code (llama-server's), else its
    Anthropic type (overloaded_error: 503), else 500."""
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return STATUS_OF_TYPE.get(str(error.get("type")), 500)


def failure_kind(exc: Exception) -> str:
    return "timeout" if isinstance(exc, UpstreamTimeout) else "broken"


def is_stream(upstream: ClientResponse) -> bool:
    return upstream.content_type == "text/event-stream" and upstream.status == 200


async def as_events(answer: web.Response, stream: web.StreamResponse) -> web.StreamResponse:
    """A whole answer from a backend that ignored `stream`, sent as one event on a stream that
    has already started (errors are raised, and the front ends the stream with them)."""
    body = answer.body if isinstance(answer.body, bytes) else b""
    await stream.write(b"data: " + body.replace(b"\n", b"") + b"\n\ndata: [DONE]\n\n")
    await stream.write_eof()
    return stream


RELAY = web.AppKey("relay", Relay)


def setup_relay(app: web.Application, *, timeouts: Timeouts, max_connections: int) -> None:
    """The HTTP client to the model servers, and the relay around it (app[RELAY])."""
    app.cleanup_ctx.append(functools.partial(_client, timeouts, max_connections))


async def _client(timeouts: Timeouts, max_connections: int, app: web.Application
                  ) -> AsyncIterator[None]:
    # limit=0: no hidden cap (aiohttp's default of 100 would queue the 101st stream silently).
    connector = TCPConnector(limit=max_connections, limit_per_host=0)
    # No total/read timeout here: the relay sets connect, first-byte and idle deadlines itself.
    timeout = ClientTimeout(total=None, connect=timeouts.connect, sock_read=None)
    # No cookie jar: this one client speaks for every user, so a cookie a model server set
    # would otherwise go back with everyone's requests.
    async with ClientSession(connector=connector, timeout=timeout,
                             cookie_jar=DummyCookieJar()) as client:
        app[HTTP_CLIENT] = client
        app[RELAY] = Relay(client, timeouts, unreachable=_mark_down)
        yield


def _mark_down(backend: Backend, why: str) -> None:
    # The supervisor owns the child's state; a health check brings an upstream back.
    if not backend.supervised:
        backend.set_state(State.DOWN, why)
