"""Forward one OpenAI request to a backend and send its answer back, streamed or whole.

Bytes pass through untouched (no per-chunk JSON parsing). Streamed answers are written chunk by
chunk as they arrive; when the client leaves, the upstream connection is closed at once so
llama-server frees its slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import orjson
from aiohttp import (
    ClientConnectionError,
    ClientConnectorError,
    ClientError,
    ClientOSError,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    ServerDisconnectedError,
    web,
)

from config import Settings
from proxy.backends import Backend, BackendPool, State
from proxy.errors import ERROR_TYPES, OpenAIError, error_body, sse_error_event
from proxy.keys import CLIENT, OPEN_STREAM, POOL, REQUEST_ID, SETTINGS
from proxy.usage import UsageMeter

log = logging.getLogger("proxy.relay")

LOADING_RETRY_AFTER = "2"
DOWN_RETRY_AFTER = "10"


class Unreachable(Exception):
    """The backend could not be reached at all; another one may be tried."""


def choose_backends(request: web.Request, model: str | None) -> list[Backend]:
    """The ready backends for this model, in round-robin order; 404 or 503 if there are none.

    Decided before rate limits are charged, so a refused request costs the caller nothing.
    """
    pool: BackendPool = request.app[POOL]
    candidates = pool.serving(model)
    if not candidates:
        raise OpenAIError(404, f"The model `{model}` does not exist", code="model_not_found",
                          param="model")
    ready = pool.ready(candidates)
    if not ready:
        raise unavailable(candidates)
    return ready


async def relay(request: web.Request, backends: list[Backend], path: str, raw: bytes,
                stream: bool, meter: UsageMeter | None = None) -> web.StreamResponse:
    """Send raw (an already-validated JSON body) to the first backend that answers."""
    for backend in backends:
        try:
            upstream = await _open(request, backend, path, raw, stream)
        except Unreachable as exc:
            log.warning("%s: backend %s unreachable: %s", request[REQUEST_ID], backend.name, exc)
            if not backend.supervised:  # the health check brings it back
                backend.set_state(State.DOWN, str(exc))
            continue
        if upstream.content_type == "text/event-stream" and upstream.status == 200:
            return await _stream(request, upstream, request.app[SETTINGS], meter)
        return await _whole(upstream, request.app[SETTINGS], meter)
    raise OpenAIError(502, "The model server could not be reached", code="upstream_unreachable")


def unavailable(candidates: list[Backend]) -> OpenAIError:
    if any(b.state is State.STARTING for b in candidates):
        return OpenAIError(503, "The model is loading; retry shortly", code="model_loading",
                           headers={"Retry-After": LOADING_RETRY_AFTER})
    reasons = "; ".join(f"{b.name}: {b.reason or b.state}" for b in candidates)
    return OpenAIError(503, f"No model server is available ({reasons})",
                       code="backend_unavailable", headers={"Retry-After": DOWN_RETRY_AFTER})


async def _open(request: web.Request, backend: Backend, path: str, raw: bytes, stream: bool
                ) -> ClientResponse:
    """POST to the backend and wait for its response headers (the first byte)."""
    settings: Settings = request.app[SETTINGS]
    client: ClientSession = request.app[CLIENT]
    headers = {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "X-Request-Id": request[REQUEST_ID],
        **backend.auth_headers(),
    }
    if stream:
        # llama-server closes the connection after a stream although it said keep-alive;
        # never pool such a connection, or the next request would find it dead.
        headers["Connection"] = "close"
    timeout = _client_timeout(settings.request_timeout, settings.connect_timeout)
    # A pooled connection may have been closed by the server just after a streamed response
    # (llama-server does this although it advertised keep-alive): retry that once, fresh.
    for attempt in (1, 2):
        try:
            async with asyncio.timeout(settings.first_byte_timeout):
                return await client.post(backend.url(path), data=raw, headers=headers,
                                         timeout=timeout)
        except TimeoutError:
            raise OpenAIError(504, "The model server did not answer in time",
                              code="upstream_timeout") from None
        except ClientConnectorError as exc:  # nothing listening: no retry here
            raise Unreachable(str(exc) or type(exc).__name__) from exc
        except (ServerDisconnectedError, ClientOSError) as exc:  # a dead pooled connection
            if attempt == 2:
                raise Unreachable(f"connection dropped before an answer ({exc})") from exc
        except ClientConnectionError as exc:
            raise Unreachable(str(exc) or type(exc).__name__) from exc
    raise AssertionError("unreachable")


@functools.cache
def _client_timeout(total: float, connect: float) -> ClientTimeout:
    """Built once, not per request: connect and whole-request caps; the rest is the relay's."""
    return ClientTimeout(total=total or None, connect=connect, sock_read=None)


async def _whole(upstream: ClientResponse, settings: Settings, meter: UsageMeter | None
                 ) -> web.Response:
    """A non-streamed answer: read it all, make sure errors are in OpenAI's shape."""
    try:
        async with asyncio.timeout(settings.idle_timeout):
            body = await upstream.read()
    except TimeoutError:
        raise OpenAIError(504, "The model server stopped sending its answer",
                          code="upstream_timeout") from None
    except ClientError as exc:
        raise OpenAIError(502, "The model server broke off its answer",
                          code="upstream_error") from exc
    finally:
        upstream.release()
    status = upstream.status
    if meter is not None and status == 200:
        meter.from_body(body)
    headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json")}
    if status >= 400:
        body = _as_openai_error(status, body)
        headers["Content-Type"] = "application/json"
        if status == 503:
            headers["Retry-After"] = upstream.headers.get("Retry-After", LOADING_RETRY_AFTER)
    return web.Response(status=status, body=body, headers=headers)


def _as_openai_error(status: int, body: bytes) -> bytes:
    """Keep an upstream error that is already OpenAI-shaped; wrap anything else."""
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            err = parsed["error"]
            message = str(err.get("message") or "Model server error")
            kind = str(err.get("type") or ERROR_TYPES.get(status, "server_error"))
            code = err.get("code")
            return orjson.dumps(error_body(message, kind, None if code is None else str(code),
                                           err.get("param")))
    except orjson.JSONDecodeError:
        pass
    text = body.decode(errors="replace").strip()[:200] or f"HTTP {status}"
    return orjson.dumps(error_body(f"Model server error: {text}",
                                   ERROR_TYPES.get(status, "server_error"), "upstream_error"))


async def _stream(request: web.Request, upstream: ClientResponse, settings: Settings,
                  meter: UsageMeter | None) -> web.StreamResponse:
    """Pass SSE chunks through as they arrive; end with an error event if upstream fails."""
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # tell any proxy in front of us not to buffer either
    })
    loop = asyncio.get_running_loop()
    request[OPEN_STREAM] = response  # a shutdown past its grace ends it with an error event
    try:
        await response.prepare(request)
        # One deadline, moved forward per chunk (cheaper than a new timeout for each).
        async with asyncio.timeout(None) as idle:
            while True:
                idle.reschedule(loop.time() + settings.idle_timeout)
                chunk = await upstream.content.readany()
                idle.reschedule(None)
                if not chunk:
                    if meter is not None and (rest := meter.flush()):
                        await response.write(rest)
                    break
                if meter is not None:
                    chunk = meter.filter(chunk)
                    if not chunk:
                        continue
                await response.write(chunk)
    except ConnectionResetError:
        log.info("%s: client went away mid-stream; closing upstream", request[REQUEST_ID])
        return response
    except (TimeoutError, ClientError) as exc:
        failure = ("The model server went silent" if isinstance(exc, TimeoutError)
                   else "The model server broke off the stream")
        log.warning("%s: %s (%s)", request[REQUEST_ID], failure, type(exc).__name__)
        code = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
        try:
            await response.write(sse_error_event(failure, code=code))
        except ConnectionResetError:
            return response
    finally:
        # Closing (not releasing) drops the connection: a half-read stream is abandoned at
        # once, and llama-server closes finished streams itself anyway.
        upstream.close()
    await response.write_eof()
    return response
