"""CORS for browser apps on other origins (the appliance's own page is same-origin and needs none).

A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, before
authentication: browsers never send credentials with one, so it must neither need one nor count
as a failed login. Answers to allowed origins carry `Access-Control-Allow-Origin` and expose
the request id and rate-limit headers; `Vary: Origin` always, so no cache serves one origin's
answer to another. Credentials travel in headers, never cookies, so
`Access-Control-Allow-Credentials` is never sent (and `*` is only ever sent without it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.errors import OpenAIError

PATHS = ("/v1/", "/api/")  # and the model APIs at the root, given to setup_cors
ALLOW_HEADERS = ("authorization", "content-type", "x-api-key", "x-request-id",
                 "ngrok-skip-browser-warning", "anthropic-version", "anthropic-beta",
                 "anthropic-dangerous-direct-browser-access")
EXPOSE_HEADERS = ", ".join((
    "x-request-id", "request-id", "retry-after",
    *(f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens")
      for what in ("limit", "remaining", "reset")),
    *(f"anthropic-ratelimit-{kind}-{what}" for kind in ("requests", "tokens")
      for what in ("limit", "remaining", "reset"))))
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer
_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an HTTP header name
ORIGINS = web.AppKey("cors_origins", frozenset)
CORS_PATHS = web.AppKey("cors_paths", tuple)


def setup_cors(app: web.Application, origins: Iterable[str], root_paths: Iterable[str] = ()
               ) -> None:
    """root_paths: API paths outside /v1/ and /api/ that browsers may call too. Call after
    setup_front (its answers get ids and log lines) and before setup_auth."""
    app[ORIGINS] = frozenset(o.rstrip("/").lower() for o in origins)
    app[CORS_PATHS] = (*PATHS, *root_paths)
    app.middlewares.append(preflight)
    app.on_response_prepare.append(_stamp)


def _allowed(request: web.Request) -> str | None:
    """The value for Access-Control-Allow-Origin, or None for an origin not allowed."""
    origin = request.headers.get(hdrs.ORIGIN)
    origins = request.app[ORIGINS]
    if not origin or not request.path.startswith(request.app[CORS_PATHS]):
        return None
    if origin.lower() in origins:
        return origin
    return "*" if "*" in origins else None


@web.middleware
async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != hdrs.METH_OPTIONS:
        return await handler(request)
    if not request.path.startswith(request.app[CORS_PATHS]):
        return await handler(request)
    methods = _methods(request)
    if methods is None:  # no such path
        return await handler(request)
    wanted = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
    if wanted is None:  # a plain OPTIONS: say what the path allows, nothing to authenticate
        return web.Response(status=204, headers={hdrs.ALLOW: ", ".join(methods)})
    allow = _allowed(request)
    if allow is None:
        raise OpenAIError(403, "This origin may not call the appliance from a browser "
                          "(the operator can add it to cors_origins)", code="origin_not_allowed")
    asked = [h.strip().lower() for h in
             request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").split(",") if h.strip()]
    if wanted.upper() not in methods or not all(_TOKEN.fullmatch(h) for h in asked):
        raise OpenAIError(403, "This method or header may not be used from a browser",
                          code="cors_not_allowed")
    # An origin the operator allowed may send any header its client library adds (the
    # openai SDK sends x-stainless-*): credentials are checked on the request itself.
    allowed = sorted(set(ALLOW_HEADERS) | set(asked))
    return web.Response(status=204, headers={
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(methods),
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(allowed),
        hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
    })


def _methods(request: web.Request) -> list[str] | None:
    """The methods the path has (from the router, which found none for OPTIONS itself)."""
    missing = request.match_info.http_exception
    if not isinstance(missing, web.HTTPMethodNotAllowed):
        return None
    return [*sorted(m for m in missing.allowed_methods if m != hdrs.METH_HEAD), "OPTIONS"]


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: errors and streams too, so a page can read a 401 or a 429's wait."""
    if not request.path.startswith(request.app[CORS_PATHS]):
        return
    response.headers.add(hdrs.VARY, hdrs.ORIGIN)
    allow = _allowed(request)
    if allow is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
