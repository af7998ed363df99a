"""The application factory: settings in, a wired aiohttp app out; resources via cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from auth.apikeys import KeyStore
from auth.authenticator import Authenticator
from auth.guard import FailureGuard
from auth.ratelimit import RateLimiter
from auth.tokens import TokenVerifier
from config import Settings
from proxy.admin import setup_admin_routes
from proxy.admission import FairQueue
from proxy.backends import Backend, BackendPool, check_upstream, watch_upstreams
from proxy.drain import Drain
from proxy.keys import (
    AUTH,
    CLIENT,
    DRAIN,
    GUARD,
    KEYS,
    LIMITER,
    POOL,
    QUEUE,
    REDIS,
    SETTINGS,
    SUPERVISOR,
)
from proxy.limits import stamp_limit_headers
from proxy.logs import register_secret
from proxy.middlewares import MIDDLEWARES, stamp_headers
from proxy.redis_server import open_store
from proxy.routes import setup_routes
from proxy.shared_slots import SlotBorrower
from proxy.supervisor import LlamaSupervisor


def create_app(settings: Settings, slots_from: Path | None = None,
               on_shutdown: Sequence[Callable[[web.Application], Awaitable[None]]] = ()
               ) -> web.Application:
    """slots_from: an extra --workers process borrows the model's slots from the first one."""
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=MIDDLEWARES)
    app[SETTINGS] = settings
    for secret in (settings.upstream_api_key, settings.admin_key, settings.jwt_secret,
                   settings.redis_url):
        register_secret(secret)
    app.on_response_prepare.append(stamp_headers)
    app.on_response_prepare.append(stamp_limit_headers)
    if slots_from is not None and settings.admission_slots > 0:
        # A worker that lost the first process's queue shuts down; the first process restarts it.
        borrower = SlotBorrower(slots_from, settings.admission_slots, settings.queue_timeout,
                                on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
        app[QUEUE] = borrower
        app.cleanup_ctx.append(functools.partial(borrowed_slots, borrower))
    else:
        app[QUEUE] = FairQueue(settings.admission_slots, settings.queue_max,
                               settings.queue_timeout)
    app[DRAIN] = Drain()
    app.on_shutdown.append(drain_requests)
    app.on_shutdown.extend(on_shutdown)
    # Order matters: the store comes up before the model, so a bad Redis fails fast.
    app.cleanup_ctx.append(upstream_client)
    app.cleanup_ctx.append(credential_store)
    app.cleanup_ctx.append(backends)
    setup_routes(app)
    setup_admin_routes(app)
    return app


async def drain_requests(app: web.Application) -> None:
    """on_shutdown (the listening socket is closed by then): finish or cut in-flight requests."""
    await app[DRAIN].wait(app[SETTINGS].shutdown_grace, at_deadline=app[QUEUE].close)


def prepare_data_dir(path: Path) -> None:
    """Create the data dir owner-only; everything the appliance persists lives in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


async def borrowed_slots(borrower: SlotBorrower, app: web.Application) -> AsyncIterator[None]:
    await borrower.connect()
    yield
    await borrower.aclose()


async def upstream_client(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # limit=0: no hidden cap (aiohttp's default of 100 would queue the 101st stream silently).
    connector = TCPConnector(limit=settings.upstream_connections, limit_per_host=0)
    # No total/read timeout here: the relay sets connect, first-byte and idle deadlines itself.
    timeout = ClientTimeout(total=None, connect=settings.connect_timeout, sock_read=None)
    async with ClientSession(connector=connector, timeout=timeout) as client:
        app[CLIENT] = client
        yield


async def credential_store(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    prepare_data_dir(settings.data_dir)
    redis, embedded = await open_store(settings)
    keys = KeyStore(redis, settings.key_cache_ttl)
    tokens = TokenVerifier(settings)
    app[REDIS], app[KEYS] = redis, keys
    app[AUTH] = Authenticator(settings, keys, tokens)
    app[GUARD] = FailureGuard(settings.auth_fail_limit, settings.auth_fail_window)
    app[LIMITER] = RateLimiter(redis, settings)
    try:
        yield
    finally:
        await keys.drain()
        await app[LIMITER].aclose()
        await redis.aclose()
        if embedded is not None:
            await embedded.stop()


async def backends(app: web.Application) -> AsyncIterator[None]:
    settings, client = app[SETTINGS], app[CLIENT]
    pool: list[Backend] = []
    supervisor = None
    if settings.supervise:
        child = Backend("llama-server", "", models=(str(settings.model_alias),), supervised=True)
        supervisor = LlamaSupervisor(settings, client, child)
        supervisor.start()
        pool.append(child)
    upstreams = [Backend(f"upstream-{i}", url, settings.upstream_api_key)
                 for i, url in enumerate(settings.upstreams, 1)]
    # One check before serving, so /v1/models knows the upstreams' model ids.
    grace = settings.startup_timeout
    await asyncio.gather(*(check_upstream(client, b, settings.connect_timeout, grace)
                           for b in upstreams))
    app[POOL] = BackendPool(pool + upstreams)
    app[SUPERVISOR] = supervisor
    watcher = (asyncio.create_task(watch_upstreams(client, upstreams, settings.health_interval,
                                                   grace)) if upstreams else None)
    yield
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if supervisor is not None:
        await supervisor.stop()
