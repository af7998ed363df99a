"""The edge every request passes first: its id, the answer in OpenAI's shape whatever went wrong
below, the access log line, security headers, and shutdown that waits for it or cuts it short
with an answer (proxy/edge/drain.py). One middleware, as aiohttp wraps each one per request; the
authentication middleware (proxy/access/authn.py) comes next, so its refusals are shaped and logged
like any error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.api.failures import to_openai
from proxy.edge.connection import SECURITY_HEADERS
from proxy.edge.drain import DRAIN, OPEN_STREAM, Drain
from proxy.edge.forwarded import client_address, client_scheme
from proxy.edge.ids import REQUEST_ID, new_id
from proxy.errors import OpenAIError, speaks_anthropic
from proxy.observe.outcome import OUTCOME, Outcome, finished
from quota.slots import SHUTTING_DOWN, QueueClosed

log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy.errors")

# A client's own id is kept only if it is short and plain (no header or log injection).
HSTS = "max-age=31536000"  # a year; no includeSubDomains: the domain may host other things
_SANE_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


def setup_front(app: web.Application, *, shutdown_grace: float) -> None:
    """Call first: its middleware must be the outermost."""
    app[DRAIN] = Drain()
    app.middlewares.append(front)
    app.on_response_prepare.append(_stamp_headers)
    app.on_shutdown.append(functools.partial(_drain, shutdown_grace))


async def _drain(grace: float, app: web.Application) -> None:
    """on_shutdown (the listening socket is closed by then): finish or cut what is in flight."""
    await app[DRAIN].wait(grace)


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if _SANE_ID.fullmatch(given) else new_id()
    request[OUTCOME] = outcome = Outcome()
    outcome.status = 499  # nginx's "client closed request", if we are cancelled
    drain = request.app[DRAIN]
    try:
        with drain.track():
            try:
                response = await _in_openai_shape(request, handler)
            except asyncio.CancelledError:
                if not drain.aborting:  # the client left: nobody to answer
                    outcome.disconnect = outcome.disconnect or "gone"
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                response = await cut_short(request, request.get(OPEN_STREAM))
        # A client that left mid-stream is a 499 whichever noticed first: the edge (cancelling
        # us) or a write that failed.
        outcome.status = 499 if outcome.disconnect == "gone" else response.status
        return response
    except web.HTTPException as exc:  # redirects and the like pass through
        outcome.status = exc.status
        raise
    finally:
        outcome.duration = time.perf_counter() - outcome.started
        if log.isEnabledFor(logging.INFO):  # --log-level warning: not even built
            _access_line(request, outcome)
        finished(request, outcome)


def _access_line(request: web.Request, outcome: Outcome) -> None:
    """One line per request. The path only (query strings can carry credentials), as sent:
    percent-encoded, so a decoded newline or escape code can never forge a log line. With
    --log-format json the fields are keys of their own (proxy/observe/logs.py)."""
    fields = access_fields(outcome)
    detail = " ".join(f"{name}={value}" for name, value in fields.items())
    rid, client, path = request[REQUEST_ID], client_address(request), _short(
        request.rel_url.raw_path)
    log.info("%s %s \"%s %s\" %d %.1fms%s", rid, client, request.method, path, outcome.status,
             outcome.duration * 1000, f" {detail}" if detail else "",
             extra={"access": {"request_id": rid, "client": client, "method": request.method,
                               "path": path, "status": outcome.status,
                               "duration_ms": round(outcome.duration * 1000, 2), **fields}})


def access_fields(outcome: Outcome) -> dict[str, str | int | float]:
    """What the access line adds to method, path and status, when known."""
    fields: dict[str, str | int | float] = {}
    if outcome.principal:
        fields["principal"] = outcome.principal
    if outcome.model:
        fields["model"] = outcome.model
    if outcome.limit:
        fields["limit"] = outcome.limit
    if outcome.auth_failure:
        fields["auth"] = outcome.auth_failure
    if outcome.queue_wait is not None:
        fields["queue_ms"] = round(outcome.queue_wait * 1000, 1)
    if outcome.queue_refused:
        fields["queue"] = outcome.queue_refused
    if outcome.first_token is not None:
        fields["ttft_ms"] = round(outcome.first_token * 1000, 1)
    if outcome.metered:
        fields["prompt_tokens"] = outcome.prompt_tokens or 0
        fields["completion_tokens"] = outcome.completion_tokens or 0
    if outcome.disconnect:
        fields["disconnect"] = outcome.disconnect
    return fields


def _short(path: str, most: int = 256) -> str:
    """A crafted long path must not make every log line kilobytes long."""
    return path if len(path) <= most else path[:most] + "..."


async def _in_openai_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        error = to_openai(exc, request)
        if error is None:
            if isinstance(exc, web.HTTPException):  # below 400: a redirect, not an error
                raise
            error_log.exception("unhandled error in %s %s (request %s)", request.method,
                                request.rel_url.raw_path, request[REQUEST_ID])
            error = OpenAIError(500, f"Internal error; request id {request[REQUEST_ID]}",
                                code="internal_error")
        return await _answer(request, error)


async def _answer(request: web.Request, error: OpenAIError) -> web.StreamResponse:
    """On a stream that has already started, any error, ours included, can only be the SSE
    event that ends it (a second response would leave the client waiting for an end)."""
    return await answer(error, request.get(OPEN_STREAM), speaks_anthropic(request.path))


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for streamed responses too, before the first byte."""
    rid = response.headers["X-Request-Id"] = request.get(REQUEST_ID) or new_id()
    if speaks_anthropic(request.path):  # where Anthropic's SDKs look for it
        response.headers["request-id"] = rid
    response.headers["Server"] = "llama-proxy"  # no library or version banner for scanners
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if client_scheme(request) == "https":  # browsers heed HSTS only when it came over TLS
        response.headers.setdefault("Strict-Transport-Security", HSTS)


async def cut_short(request: web.Request, stream: web.StreamResponse | None
                    ) -> web.StreamResponse:
    """The answer of a request cancelled by shutdown: an SSE error event on a stream already
    under way, a 503 otherwise."""
    error = to_openai(QueueClosed(SHUTTING_DOWN), request)
    assert error is not None
    return await answer(error, stream, speaks_anthropic(request.path))


async def answer(error: OpenAIError, stream: web.StreamResponse | None,
                 anthropic: bool = False) -> web.StreamResponse:
    """The error's own response; or, on a stream already under way, the SSE error event
    that ends it. anthropic: in the shape of Anthropic's API."""
    if stream is None or not stream.prepared:
        return error.response(anthropic)
    with contextlib.suppress(ConnectionResetError):
        await stream.write(error.sse_event(anthropic))
        await stream.write_eof()
    return stream
