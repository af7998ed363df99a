"""The middleware chain, outermost first, and the headers stamped on every response.

Order and why:
1. front - names the request (x-request-id), turns any failure below it into OpenAI's JSON shape,
   logs the final status of every request, and lets shutdown wait for it or cut it short with
   an answer (proxy/drain.py); one layer, as aiohttp wraps each per request;
2. authenticate (proxy/authn.py) - inside it, so its refusals are shaped and logged like any error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.admission import Busy
from proxy.authn import authenticate
from proxy.drain import cut_short
from proxy.errors import OpenAIError
from proxy.ids import new_id
from proxy.keys import DRAIN, OPEN_STREAM, REQUEST_ID, SETTINGS

log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy.errors")

# A client's own id is kept only if it is short and plain (no header or log injection).
_SANE_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if _SANE_ID.fullmatch(given) else new_id()
    started = time.perf_counter()
    status = 499  # nginx's "client closed request", if we are cancelled
    drain = request.app[DRAIN]
    try:
        with drain.track():
            try:
                response = await _in_openai_shape(request, handler)
            except asyncio.CancelledError:
                if not drain.aborting:  # the client left: nobody to answer
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                response = await cut_short(request.get(OPEN_STREAM))
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects and the like pass through
        status = exc.status
        raise
    finally:
        # The path only: query strings can carry credentials.
        log.info("%s %s \"%s %s\" %d %.1fms", request[REQUEST_ID], request.remote, request.method,
                 request.path, status, (time.perf_counter() - started) * 1000)


async def _in_openai_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OpenAIError as exc:
        return exc.response()
    except Busy as exc:
        return OpenAIError(503, str(exc), code=exc.code,
                           headers={"Retry-After": str(exc.retry_after)}).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        error_log.exception("unhandled error in %s %s (request %s)", request.method,
                            request.path, request[REQUEST_ID])
        return OpenAIError(500, f"Internal error; request id {request[REQUEST_ID]}",
                           code="internal_error").response()


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> OpenAIError:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    if exc.status == 404:
        message, code = f"Invalid URL ({request.method} {request.path})", "not_found"
    elif exc.status == 405:
        message, code = f"Method {request.method} is not allowed on {request.path}", None
    elif exc.status == 413:
        limit = request.app[SETTINGS].max_body_bytes
        message = f"Request body is larger than the limit of {limit} bytes"
        code = "request_too_large"
    else:
        message, code = exc.reason, None
    return OpenAIError(exc.status, message, code=code, headers=headers)


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for streamed responses too, before the first byte."""
    response.headers["X-Request-Id"] = request.get(REQUEST_ID) or new_id()
    response.headers["Server"] = "llama-proxy"  # no library or version banner for scanners
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


MIDDLEWARES = [front, authenticate]
