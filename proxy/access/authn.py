"""Authentication at the edge: every route needs a credential (/admin an admin one) except the
few named public here, so a route added later is never reachable without one; too many
failures from one client address block it for a while."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from auth.apikeys import KeyStore
from auth.authenticator import Authenticator
from auth.errors import (
    AuthError,
    CredentialRejected,
    CredentialStoreDown,
    NotPermitted,
    TooManyFailures,
)
from auth.guard import FailureGuard
from auth.principal import ADMIN, INFERENCE, Principal
from auth.tokens import TokenVerifier
from proxy.edge.connection import Throttled
from proxy.edge.forwarded import client_address, client_group
from proxy.observe.outcome import outcome_of
from proxy.state.store import REDIS

log = logging.getLogger("proxy.auth")

PROTECTED = ("/v1/", "/api/")  # a credential even for a path that does not exist
ADMIN_PREFIX = "/admin/"
# What needs no credential: the chat page and its files, health, the OpenAPI document, and
# /metrics (which checks its own).
PUBLIC = frozenset(("/", "/health", "/ready", "/metrics", "/openapi.json"))
PUBLIC_PREFIXES = ("/static/",)
AUTH = web.AppKey("auth", Authenticator)
KEYS = web.AppKey("keys", KeyStore)
GUARD = web.AppKey("guard", FailureGuard)
PRINCIPAL = web.RequestKey("principal", Principal)  # set here, for every protected request
REFUSED = web.AppKey("refused_log", Throttled)


def setup_auth(app: web.Application, *, tokens: TokenVerifier, required: bool, dev_mode: bool,
               admin_key: str | None, key_cache_ttl: float, fail_limit: int,
               fail_window: float) -> None:
    """Call after setup_front (its middleware must run first) and setup_store."""
    app[GUARD] = FailureGuard(fail_limit, fail_window)
    # One line per few seconds: bad credentials from many addresses must not flood the log
    # (the metrics count every failure).
    app[REFUSED] = Throttled(logging.WARNING, "auth refused (%s) for %s %s from %s: %s", log)
    app.middlewares.append(authenticate)
    app.cleanup_ctx.append(functools.partial(
        _credentials, tokens, key_cache_ttl,
        functools.partial(Authenticator, required=required, dev_mode=dev_mode,
                          admin_key=admin_key)))


async def _credentials(tokens: TokenVerifier, key_cache_ttl: float,
                       authenticator: functools.partial[Authenticator], app: web.Application
                       ) -> AsyncIterator[None]:
    keys = KeyStore(app[REDIS], key_cache_ttl)
    app[KEYS] = keys
    app[AUTH] = authenticator(keys, tokens)
    yield
    await keys.drain()  # last-used writes still on their way, before the store closes


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    admin = path.startswith(ADMIN_PREFIX)
    if not admin and not path.startswith(PROTECTED) and _public(request):
        return await handler(request)
    request[PRINCIPAL] = await authorize(request, ADMIN if admin else INFERENCE)
    return await handler(request)


def _public(request: web.Request) -> bool:
    """A public path, or one with no route (its 404 needs no credential)."""
    path = request.path
    return (path in PUBLIC or path.startswith(PUBLIC_PREFIXES)
            or isinstance(request.match_info.http_exception, web.HTTPNotFound))


async def authorize(request: web.Request, needed: str) -> Principal:
    """The caller's principal, if its credential is good and has the `needed` scope; else an
    AuthError (its reason logged, its kind noted for the metrics)."""
    ip, group = client_address(request), client_group(request)
    guard = request.app[GUARD]
    outcome = outcome_of(request)
    if wait := guard.blocked_for(group):
        outcome.auth_failure = "blocked"
        raise TooManyFailures(wait)  # not logged: an attack must not flood the log
    try:
        principal = await request.app[AUTH].identify(request.headers, ip,
                                                     admin=needed == ADMIN)
        if not principal.can(needed):
            raise NotPermitted(f"This credential lacks the `{needed}` scope",
                               reason=f"{principal.id} lacks scope {needed}")
    except AuthError as exc:
        outcome.auth_failure = _failure_kind(exc)
        if isinstance(exc, CredentialRejected):
            guard.record(group)
        # The reason names a key prefix or jti at most; the secret itself is never logged.
        request.app[REFUSED](outcome.auth_failure, request.method, request.rel_url.raw_path,
                             ip, exc.reason)
        raise
    outcome.principal, outcome.credential = principal.id, principal.kind
    return principal


def _failure_kind(exc: AuthError) -> str:
    if isinstance(exc, CredentialRejected):
        return exc.kind
    if isinstance(exc, NotPermitted):
        return "scope"
    if isinstance(exc, CredentialStoreDown):
        return "store_down"
    return "other"
