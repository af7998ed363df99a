"""Rate limits around one model request: admit (or 429), meter the usage, settle afterwards."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from auth.ratelimit import Admission, RateLimiter, StoreDown
from config import Settings
from proxy.errors import OpenAIError
from proxy.keys import ADMISSION, LIMITER, PRINCIPAL, SETTINGS
from proxy.usage import UsageMeter, usage_requested, wants_usage_in_stream

WINDOW_NAMES = {"rpm": "requests per minute", "rpd": "requests per day",
                "tpm": "tokens per minute", "concurrency": "concurrent requests",
                "ip_rpm": "requests per minute from this IP"}


def describe_limits(settings: Settings) -> str:
    """The start-up line: which limits apply, and which client address the per-IP one sees."""
    each = [f"{value} {WINDOW_NAMES[name]}" for name, value in (
        ("rpm", settings.limit_rpm), ("rpd", settings.limit_rpd), ("tpm", settings.limit_tpm),
        ("concurrency", settings.limit_concurrency)) if value]
    parts = [", ".join(each) + " per key or user"] if each else []
    if settings.limit_ip_rpm:
        parts.append(f"{settings.limit_ip_rpm} requests per minute per client address, taken "
                     "from the connection: behind a tunnel or proxy on this host every client is "
                     "127.0.0.1 and shares that one limit (--limit-ip-rpm 0 turns it off)")
    if not parts:
        return "rate limits: none (every --limit-* is 0)"
    return ("rate limits: " + "; ".join(parts) + ". Change them with --limit-rpm, --limit-tpm, "
            "--limit-concurrency, --limit-ip-rpm (0 = off), or per credential.")


def prompt_tokens(raw: bytes) -> int:
    return len(raw) // 4 + 1  # about 4 bytes a token, JSON included: errs on the high side


BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "n_predict")


def _asked(body: dict[str, Any]) -> dict[str, int]:
    """The completion caps a request sets (positive integers only; -1 means none)."""
    return {name: value for name in BUDGET_FIELDS
            if isinstance(value := body.get(name), int) and not isinstance(value, bool)
            and value > 0}


def completion_budget(body: dict[str, Any], path: str, default_max: int) -> int:
    """The completion tokens a request asks for (none for embeddings)."""
    if path.endswith("/embeddings"):
        return 0
    return next(iter(_asked(body).values()), default_max)


def capped(body: dict[str, Any], allowed: int) -> dict[str, int]:
    """The changes that keep generation within what was reserved: a request with no cap gets
    one, a larger cap is lowered (the model server would otherwise generate past the budget)."""
    asked = _asked(body)
    if not asked:
        return {"max_tokens": allowed}
    return {name: allowed for name, value in asked.items() if value > allowed}


def estimate_tokens(raw: bytes, body: dict[str, Any], path: str, default_max: int) -> int:
    """What to reserve before generation: the prompt, plus the completion asked for."""
    return prompt_tokens(raw) + completion_budget(body, path, default_max)


@asynccontextmanager
async def limited(request: web.Request, path: str, raw: bytes, body: dict[str, Any],
                  stream: bool) -> AsyncIterator[tuple[bytes, UsageMeter | None]]:
    """Admit the request or raise 429; yield the body to send and a meter for its usage."""
    limiter: RateLimiter = request.app[LIMITER]
    prompt = prompt_tokens(raw)
    tokens = prompt + completion_budget(body, path, request.app[SETTINGS].limit_default_max_tokens)
    try:
        admission = await limiter.admit(request[PRINCIPAL], request.remote or "unknown", tokens)
    except StoreDown:
        raise OpenAIError(503, "Rate limits cannot be checked right now; retry shortly",
                          code="limits_unavailable", headers={"Retry-After": "5"}) from None
    if admission is None:
        yield raw, None
        return
    request[ADMISSION] = admission  # headers go out with the response, streamed or not
    admission.prompt_estimate = prompt
    if not admission.allowed:
        raise refusal(admission)
    meter = None
    window = admission.token_window
    if window is not None:
        changes: dict[str, Any] = {}
        if not path.endswith("/embeddings"):
            changes.update(capped(body, max(window.cost - prompt, 1)))
        strip = stream and not wants_usage_in_stream(body)
        if strip:
            changes["stream_options"] = usage_requested(body)
        if changes:
            raw = orjson.dumps({**body, **changes})
        meter = UsageMeter(admission, strip)
    try:
        yield raw, meter
    finally:
        limiter.settle(admission)  # queued, not awaited: off the latency path


def refusal(admission: Admission) -> OpenAIError:
    retry = max(1, math.ceil(admission.retry_ms / 1000))
    which = ", ".join(f"{WINDOW_NAMES[w.name]} (limit {w.limit})" for w in admission.denied())
    return OpenAIError(429, f"Rate limit reached for {which}; retry in {retry}s",
                       code="rate_limit_exceeded", type="rate_limit_exceeded",
                       headers={"Retry-After": str(retry)})


async def stamp_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    admission = request.get(ADMISSION)
    if admission is not None:
        response.headers.update(admission.headers())
