"""Quota at the edge: rate limits around one model request (admit or refuse, cap generation at
what was reserved, meter the usage, settle afterwards), the model's slot queue (held through
the catalog, which starts the model if it must), and OpenAI's x-ratelimit-* headers. The rules
themselves live in quota/."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.access.shared_slots import SlotBorrower
from proxy.edge.drain import DRAIN
from proxy.edge.forwarded import client_group
from proxy.edge.ids import new_id
from proxy.errors import speaks_anthropic
from proxy.state.store import REDIS
from proxy.upstream.apis import ALL_CAPS, Api
from proxy.upstream.backends import Backend
from proxy.upstream.call import ModelCall
from proxy.upstream.catalog import CatalogModel
from proxy.upstream.pool import CATALOG
from proxy.upstream.usage import UsageMeter, usage_requested, wants_usage_in_stream
from quota.limiter import Limiter, RateLimited
from quota.slots import Busy, FairQueue, QueueClosed, QueueFull, QueueTimeout
from quota.windows import REQUEST_WINDOWS, WINDOW_NAMES, Admission, Limits

LIMITER = web.AppKey("limiter", Limiter)
# An extra --workers process borrows each model (its start and its slots) from the first one.
BORROWER = web.AppKey("borrower", SlotBorrower)
# Token counts, the tokenizer, the chat template: no model slot, but a lane of their own as wide
# as the default model's queue, so a flood of huge ones cannot take all of the model server's CPU.
CHEAP_LANE = web.AppKey("cheap_lane", FairQueue)
DEFAULT_MAX_TOKENS = web.AppKey("default_max_tokens", int)
STREAM_USAGE = web.AppKey("stream_usage", bool)  # ask upstreams for usage in streams
ADMISSION = web.RequestKey("admission", Admission)  # set when rate limits apply
BUSY_REASONS = {QueueFull: "full", QueueTimeout: "timeout", QueueClosed: "closed"}


def setup_quota(app: web.Application, *, limits: Limits, fail_open: bool, default_max_tokens: int,
                cheap_slots: int, queue_max: int, queue_timeout: float,
                slots_from: Path | None = None, borrow_timeout: float = 0.0,
                stream_usage: bool = True) -> None:
    """Rate limits (on the store's Redis) and the lane of the cheap APIs; slots_from: an extra
    --workers process borrows the first process's models (borrow_timeout: the longest the
    first process may make a request wait). Call after setup_front and setup_store."""
    app[DEFAULT_MAX_TOKENS] = default_max_tokens
    app[STREAM_USAGE] = stream_usage
    app.cleanup_ctx.append(functools.partial(_limiter, limits, fail_open))
    if slots_from is not None:
        # A worker that lost the first process's lender shuts down; the first one restarts it.
        borrower = SlotBorrower(slots_from, borrow_timeout,
                                on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
        app[BORROWER] = borrower
        app.cleanup_ctx.append(functools.partial(_borrowed, borrower))
        app[DRAIN].at_deadline.append(borrower.close)
    app[CHEAP_LANE] = FairQueue(cheap_slots, queue_max, queue_timeout)
    app[DRAIN].at_deadline.append(functools.partial(_close_queues, app))
    app.on_response_prepare.append(_stamp_limit_headers)


def _close_queues(app: web.Application) -> None:
    """Shutdown past its grace: no more waiting for a slot."""
    app[CHEAP_LANE].close()
    if CATALOG in app:
        for model in app[CATALOG].models:
            model.queue.close()


async def _limiter(limits: Limits, fail_open: bool, app: web.Application
                   ) -> AsyncIterator[None]:
    limiter = Limiter.on_redis(app[REDIS], limits, fail_open=fail_open)
    app[LIMITER] = limiter
    yield
    await limiter.aclose()  # settlements still queued go out before the store closes


async def _borrowed(borrower: SlotBorrower, app: web.Application) -> AsyncIterator[None]:
    await borrower.connect()
    yield
    await borrower.aclose()


def describe_limits(limits: Limits, behind_proxy: bool = False) -> str:
    """The start-up line: which limits apply, and which client address the per-IP one sees."""
    each = [f"{value} {WINDOW_NAMES[name]}" for name, value in (
        ("rpm", limits.rpm), ("rpd", limits.rpd), ("tpm", limits.tpm),
        ("concurrency", limits.concurrency)) if value]
    parts = [", ".join(each) + " per key or user"] if each else []
    if limits.ip_rpm:
        source = ("named by the trusted proxy in front" if behind_proxy else "taken from the "
                  "connection: behind a tunnel or proxy every client is its address and shares "
                  "that one limit unless it is trusted (--trusted-proxies, "
                  "--trust-loopback-proxy)")
        parts.append(f"{limits.ip_rpm} requests per minute per client address, {source}")
    if not parts:
        return "rate limits: none (every --limit-* is 0)"
    return ("rate limits: " + "; ".join(parts) + ". Change them with --limit-rpm, --limit-tpm, "
            "--limit-concurrency, --limit-ip-rpm (0 = off), or per credential.")


def prompt_tokens(raw: bytes) -> int:
    return len(raw) // 4 + 1  # about 4 bytes a token, JSON included: errs on the high side


def _asked(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, int]:
    """The output caps among `names` a request sets (positive integers only; -1 means none)."""
    return {name: value for name in names
            if isinstance(value := body.get(name), int) and not isinstance(value, bool)
            and value > 0}


def completion_budget(body: dict[str, Any], api: Api, default_max: int) -> int:
    """The completion tokens a request asks for (none for an API that does not generate)."""
    if not api.generates:
        return 0
    return next(iter(_asked(body, api.caps).values()), default_max)


def capped(body: dict[str, Any], api: Api, allowed: int) -> dict[str, int]:
    """The changes that keep generation within what was reserved: a request with none of its
    API's caps gets one (in its API's own field), and a larger cap in any field is lowered (the
    model server would otherwise generate past the budget)."""
    changes = {name: allowed for name, value in _asked(body, ALL_CAPS).items()
               if value > allowed}
    if not _asked(body, api.caps):
        changes[api.cap] = allowed
    return changes


@asynccontextmanager
async def limited(call: ModelCall, raw: bytes, body: dict[str, Any]
                  ) -> AsyncIterator[tuple[bytes, UsageMeter]]:
    """Admit the call or raise RateLimited; yield the body to send and its usage meter.
    At the end the real usage settles the reservation and goes into the request's outcome."""
    request, principal, stream, api = call.request, call.principal, call.stream, call.api
    limiter = request.app[LIMITER]
    outcome = call.outcome
    prompt = prompt_tokens(raw)
    completion = completion_budget(body, api, request.app[DEFAULT_MAX_TOKENS])
    if not api.slot:  # a token count or the tokenizer: a request, not tokens
        prompt = completion = 0
    admission = await limiter.admit(new_id(), principal.id, client_group(request),
                                    prompt + completion, rpm=principal.rpm, tpm=principal.tpm)
    changes: dict[str, Any] = {}
    if admission is not None:
        request[ADMISSION] = admission  # headers go out with the response, streamed or not
        if not admission.allowed:
            outcome.limit = next((w.name for w in admission.denied()), "rpm")
            raise RateLimited(admission)
        outcome.limit = "ok" if admission.in_store else "local"
        window = admission.token_window
        if window is not None and api.generates:
            completion = min(completion, max(window.cost - prompt, 1))
            changes.update(capped(body, api, completion))
    # OpenAI streams are asked for their usage (and the event is removed again if the client
    # did not ask): the limits, the metrics and the usage ledger all count what the model
    # reports. The other APIs report usage in their streams unasked.
    strip = (stream and api.stream_usage and not wants_usage_in_stream(body)
             and request.app[STREAM_USAGE])
    if strip:
        changes["stream_options"] = usage_requested(body)
    if changes:
        raw = orjson.dumps({**body, **changes})
    meter = UsageMeter(strip, prompt, completion, api.usage_marker)
    cancelled = False
    try:
        yield raw, meter
    except asyncio.CancelledError:  # the client left (its connection closed or was reset)
        cancelled = True
        raise
    finally:
        if cancelled or outcome.disconnect:  # or it left, or stopped reading, mid-stream
            meter.left()
        if meter.reached:  # its usage counts, zero if the model server failed it
            outcome.prompt_tokens, outcome.completion_tokens = meter.spent()
        if admission is not None:
            admission.usage = meter.total()
            limiter.settle(admission)  # queued, not awaited: off the latency path


@asynccontextmanager
async def model_slot(call: ModelCall) -> AsyncIterator[None]:
    """The model, started if it must be and held (never stopped while held), and a turn at it
    through its fair queue; an API that takes no slot (tokenize, count tokens) waits in the
    cheap lane instead. Which servers answer is known once the model is up."""
    app = call.request.app
    outcome, model, who = call.outcome, call.model, call.principal.id
    asked = time.perf_counter()
    try:
        async with _held(app, model, who, call.api.slot) as child:
            if call.api.slot or app[CHEAP_LANE].slots <= 0:
                outcome.queue_wait = time.perf_counter() - asked
                call.backends = [child] if child else model.ready_backends()
                yield
                return
            async with app[CHEAP_LANE].slot(who):
                outcome.queue_wait = time.perf_counter() - asked
                call.backends = [child] if child else model.ready_backends()
                yield
    except Busy as exc:
        if outcome.queue_wait is None:  # refused by the queue, not by something it guarded
            outcome.queue_refused = BUSY_REASONS.get(type(exc), "busy")
        raise


def _held(app: web.Application, model: CatalogModel, who: str, slot: bool
          ) -> AbstractAsyncContextManager[Backend | None]:
    """The model held, here or (an extra worker) in the first process, which names the child
    to send to."""
    if BORROWER in app:
        return app[BORROWER].use(model.id, who, slot)
    return app[CATALOG].use(model, who, slot)


def ratelimit_headers(admission: Admission, anthropic: bool = False) -> dict[str, str]:
    """The rate-limit headers for the binding request and token windows: OpenAI's
    x-ratelimit-*, or (anthropic) Anthropic's anthropic-ratelimit-* with reset as a time."""
    out: dict[str, str] = {}
    for label, names in (("requests", REQUEST_WINDOWS), ("tokens", ("tpm",))):
        rows = [row for row in admission.rows() if row[0].name in names]
        if not rows:
            continue
        window, used, reset = min(rows, key=lambda row: row[0].limit - row[1])
        # A window that was empty before this request resets when this request leaves it.
        reset_ms = (reset or window.window_ms) if used else 0
        remaining = str(max(window.limit - used, 0))
        if anthropic:
            prefix = f"anthropic-ratelimit-{label}"
            out[f"{prefix}-limit"], out[f"{prefix}-remaining"] = str(window.limit), remaining
            out[f"{prefix}-reset"] = rfc3339(math.ceil(time.time() + reset_ms / 1000))
        else:
            out[f"x-ratelimit-limit-{label}"] = str(window.limit)
            out[f"x-ratelimit-remaining-{label}"] = remaining
            out[f"x-ratelimit-reset-{label}"] = duration(reset_ms)
    return out


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


async def _stamp_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    admission = request.get(ADMISSION)
    if admission is not None:
        response.headers.update(ratelimit_headers(admission, speaks_anthropic(request.path)))
