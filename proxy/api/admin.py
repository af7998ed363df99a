"""/admin: create, list, inspect, update and revoke API keys; issue and revoke JWTs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from auth.apikeys import KeyStore
from proxy.access.authn import KEYS
from proxy.api.routes import json_response, read_json
from proxy.errors import OpenAIError

# Signs a JWT: (subject, hours, scopes=, models=, rpm=, tpm=) -> (token, jti, exp).
Issuer = Callable[..., tuple[str, str, int]]
ISSUER = web.AppKey("issuer", Issuer)

MAX_HOURS = 24 * 366 * 10
MAX_COUNT = 10**12

# Each body field the admin API reads, and what it must be (proxy/api/openapi.py says the same).


def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise OpenAIError(400, f"`{name}` must be a list of non-empty strings", param=name)
    return value


def _count(body: dict[str, Any], name: str) -> int | None:
    """A limit: a whole number from 1 up, or absent/null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        raise OpenAIError(400, f"`{name}` must be a whole number from 1 to {MAX_COUNT}",
                          param=name)
    return value


def _hours(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_HOURS:
        raise OpenAIError(400, f"`{name}` must be a number of hours above 0, at most "
                          f"{MAX_HOURS}", param=name)
    return value


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise OpenAIError(400, f"`{name}` must be a{' non-empty' if required else ''} string",
                          param=name)
    return value


def _expiry(body: dict[str, Any]) -> float | None:
    hours = _hours(body, "expires_in_hours")
    return time.time() + hours * 3600 if hours else None


def _store(request: web.Request) -> KeyStore:
    return request.app[KEYS]


async def create_key(request: web.Request) -> web.Response:
    _, body = await read_json(request)
    name = _text(body, "name", required=True)
    assert name is not None
    key, record = await _store(request).create(
        name.strip() or name, owner=_text(body, "owner") or "",
        scopes=_string_list(body, "scopes"), models=_string_list(body, "models"),
        expires=_expiry(body), rpm=_count(body, "rpm"), tpm=_count(body, "tpm"))
    return json_response({"key": key, **record.public()}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    records = await _store(request).list()
    return json_response({"object": "list", "data": [r.public() for r in records]})


async def get_key(request: web.Request) -> web.Response:
    prefix = request.match_info["prefix"]
    record = await _store(request).get(prefix)
    if record is None:
        raise OpenAIError(404, f"No API key with prefix {prefix}", code="key_not_found")
    return json_response(record.public())


async def update_key(request: web.Request) -> web.Response:
    _, body = await read_json(request)
    changes: dict[str, Any] = {}
    for name in ("rpm", "tpm"):
        if name in body:
            changes[name] = _count(body, name)
    for name in ("scopes", "models"):
        if name in body:
            changes[name] = _string_list(body, name)
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise OpenAIError(400, "`disabled` must be true or false", param="disabled")
        changes["disabled"] = body["disabled"]
    if "expires_in_hours" in body:
        changes["expires"] = _expiry(body)
    for name in ("name", "owner"):
        if name in body:
            changes[name] = _text(body, name) or ""
    prefix = request.match_info["prefix"]
    record = await _store(request).update(prefix, **changes)
    if record is None:
        raise OpenAIError(404, f"No API key with prefix {prefix}", code="key_not_found")
    return json_response(record.public())


async def revoke_key(request: web.Request) -> web.Response:
    prefix = request.match_info["prefix"]
    if not await _store(request).revoke(prefix):
        raise OpenAIError(404, f"No API key with prefix {prefix}", code="key_not_found")
    return json_response({"prefix": prefix, "revoked": True})


async def create_token(request: web.Request) -> web.Response:
    _, body = await read_json(request)
    subject = _text(body, "sub", required=True)
    assert subject is not None
    hours = _hours(body, "hours") or 24
    try:
        token, jti, exp = request.app[ISSUER](
            subject.strip() or subject, hours, scopes=_string_list(body, "scopes"),
            models=_string_list(body, "models"), rpm=_count(body, "rpm"),
            tpm=_count(body, "tpm"))
    except ValueError as exc:
        raise OpenAIError(400, str(exc), code="cannot_issue") from None
    return json_response({"token": token, "jti": jti, "expires_at": exp, "sub": subject},
                         status=201)


async def revoke_token(request: web.Request) -> web.Response:
    jti = request.match_info["jti"]
    await _store(request).revoke_jti(jti)
    return json_response({"jti": jti, "revoked": True})


def setup_admin(app: web.Application, *, issue: Issuer) -> None:
    """issue: signs the JWTs made here, as generate_token.py does."""
    app[ISSUER] = issue
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_get("/admin/keys/{prefix}", get_key)
    app.router.add_patch("/admin/keys/{prefix}", update_key)
    app.router.add_delete("/admin/keys/{prefix}", revoke_key)
    app.router.add_post("/admin/tokens", create_token)
    app.router.add_delete("/admin/tokens/{jti}", revoke_token)
