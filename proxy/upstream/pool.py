"""The model servers this appliance sends requests to: the supervised llama-server and any
--upstream servers, health-checked while it runs (app[POOL])."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

from aiohttp import web

from config import Settings
from proxy.upstream.backends import Backend, BackendPool, check_upstream, watch_upstreams
from proxy.upstream.relay import HTTP_CLIENT
from proxy.upstream.supervisor import LlamaSupervisor

POOL = web.AppKey("pool", BackendPool)
SUPERVISOR: web.AppKey[LlamaSupervisor | None] = web.AppKey("supervisor")


def setup_backends(app: web.Application, *, child: Settings | None, upstreams: list[str],
                   upstream_key: str | None, check_timeout: float, startup_grace: float,
                   health_interval: float) -> None:
    """child: the settings of a llama-server to supervise, if any. Call after setup_relay (the
    health checks use its HTTP client)."""
    app.cleanup_ctx.append(functools.partial(
        _backends, child, upstreams, upstream_key, check_timeout, startup_grace,
        health_interval))


async def _backends(child: Settings | None, urls: list[str], upstream_key: str | None,
                    check_timeout: float, grace: float, interval: float,
                    app: web.Application) -> AsyncIterator[None]:
    client = app[HTTP_CLIENT]
    pool: list[Backend] = []
    supervisor = None
    if child is not None:
        backend = Backend("llama-server", "", models=(str(child.model_alias),), supervised=True,
                          llama_cpp=True)
        supervisor = LlamaSupervisor(child, client, backend)
        await supervisor.start()
        pool.append(backend)
    upstreams = [Backend(f"upstream-{i}", url, upstream_key) for i, url in enumerate(urls, 1)]
    # One check before serving, so /v1/models knows the upstreams' model ids.
    await asyncio.gather(*(check_upstream(client, b, check_timeout, grace) for b in upstreams))
    app[POOL] = BackendPool(pool + upstreams)
    app[SUPERVISOR] = supervisor
    watcher = (asyncio.create_task(watch_upstreams(client, upstreams, interval, grace))
               if upstreams else None)
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if supervisor is not None:
            await supervisor.stop()
