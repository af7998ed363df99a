"""Usage per credential: every model request's real usage goes into the ledger
(quota/ledger.py) as it ends; `GET /v1/usage` shows callers their own, `GET /admin/usage` the
operator anyone's (`?principal=user:alice&from=2026-12-01&to=2026-12-03`, UTC days)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from proxy.access.authn import PRINCIPAL
from proxy.api.routes import json_response
from proxy.errors import OpenAIError
from proxy.observe.outcome import Outcome, on_finished
from proxy.state.store import REDIS
from quota.ledger import Ledger, date_range, total

LEDGER = web.AppKey("ledger", Ledger)
DEFAULT_DAYS = 30  # what a read without `from` covers
MAX_PRINCIPAL = 200  # longer than any principal id: "user:" and a JWT subject, "key:" a prefix


def setup_ledger(app: web.Application, *, retention_days: int) -> None:
    """Call after setup_store (the ledger lives in its Redis)."""
    app.cleanup_ctx.append(functools.partial(_ledger, retention_days))
    on_finished(app, _record)
    app.router.add_get("/v1/usage", own_usage)
    app.router.add_get("/admin/usage", any_usage)


async def _ledger(retention_days: int, app: web.Application) -> AsyncIterator[None]:
    ledger = Ledger(app[REDIS], retention_days)
    app[LEDGER] = ledger
    yield
    await ledger.aclose()  # counts not yet written go out before the store closes


def _record(request: web.Request, outcome: Outcome) -> None:
    """Observer: the usage of a model request that was let through (the same numbers the
    token limits settle with)."""
    if outcome.metered and LEDGER in request.app:
        request.app[LEDGER].record(outcome.principal, outcome.prompt_tokens or 0,
                                   outcome.completion_tokens or 0)


async def own_usage(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return await _answer(request, principal.id)


async def any_usage(request: web.Request) -> web.Response:
    who = request.query.get("principal") or None
    if who is not None and len(who) > MAX_PRINCIPAL:
        raise OpenAIError(400, "`principal` is not a principal id", param="principal")
    return await _answer(request, who)


async def _answer(request: web.Request, principal: str | None) -> web.Response:
    ledger = request.app[LEDGER]
    try:
        # A longer range than MAX_DAYS: its last MAX_DAYS days.
        start, end = date_range(request.query.get("from"), request.query.get("to"),
                                DEFAULT_DAYS)
        rows = await ledger.read(principal, start, end)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="from", code="invalid_date_range") from None
    except (RedisError, OSError):
        raise OpenAIError(503, "Usage cannot be read right now; retry shortly",
                          code="usage_unavailable", headers={"Retry-After": "5"}) from None
    body: dict[str, object] = {
        "object": "usage", "from": start.isoformat(), "to": end.isoformat(),
        "retention_days": ledger.retention_s // 86400,
        "data": [row.public() for row in rows], "total": total(rows)}
    if principal is not None:
        body["principal"] = principal
    return json_response(body)

