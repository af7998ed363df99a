"""The authentication middleware: /v1 and /api need a credential, /admin an admin one."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from auth.errors import AuthError
from auth.principal import ADMIN, INFERENCE
from proxy.errors import OpenAIError
from proxy.keys import AUTH, GUARD, PRINCIPAL

log = logging.getLogger("proxy.auth")

PROTECTED = ("/v1/", "/api/")
ADMIN_PREFIX = "/admin/"


def as_openai_error(exc: AuthError) -> OpenAIError:
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="llama-proxy", error="invalid_token"'
    if exc.retry_after:
        headers["Retry-After"] = str(exc.retry_after)
    return OpenAIError(exc.status, exc.message, code=exc.code, param=exc.param, headers=headers)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    admin = path.startswith(ADMIN_PREFIX)
    if not admin and not path.startswith(PROTECTED):
        return await handler(request)
    ip = request.remote or "unknown"
    guard = request.app[GUARD]
    wait = guard.blocked_for(ip)
    if wait:
        raise OpenAIError(429, "Too many failed authentication attempts; try again later",
                          code="auth_blocked", headers={"Retry-After": str(wait)})
    try:
        principal = await request.app[AUTH].identify(request.headers, ip, admin=admin)
        needed = ADMIN if admin else INFERENCE
        if not principal.can(needed):
            raise AuthError(403, f"This credential lacks the `{needed}` scope",
                            code="insufficient_scope",
                            reason=f"{principal.id} lacks scope {needed}")
    except AuthError as exc:
        if exc.status == 401:
            guard.record(ip)
        # The reason names a key prefix or jti at most; the secret itself is never logged.
        log.warning("auth %d for %s %s from %s: %s", exc.status, request.method, path, ip,
                    exc.reason)
        raise as_openai_error(exc) from None
    request[PRINCIPAL] = principal
    return await handler(request)
