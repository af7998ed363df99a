"""GET /metrics: who may scrape, the gauges sampled for it (slots and queue, backend states,
child restarts, Redis), and the model servers' own metrics fetched alongside.

Open to this host asking directly: from loopback, naming a loopback host (a page that rebinds a
DNS name to 127.0.0.1 names its own), no forwarding header, and no relay declared or run (no
tunnel in this process, trust_loopback_proxy off, no trusted_proxies: through any of them every
client arrives from loopback). Anyone else needs the admin credential or the metrics_token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client.core import Metric

from auth.principal import ADMIN
from config.loader import is_loopback
from proxy.access.authn import authorize
from proxy.access.limits import LIMITER
from proxy.api.metrics import CONTENT_TYPE, METRICS, Metrics, relabel
from proxy.edge.forwarded import client_address
from proxy.upstream.backends import Backend, State
from proxy.upstream.pool import CATALOG
from proxy.upstream.relay import HTTP_CLIENT

log = logging.getLogger("proxy.metrics")

FETCH_TIMEOUT = 2.0  # a model server that cannot answer its metrics quickly is skipped
RELAYED = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
SAMPLE_EVERY = 2.0  # with --workers: how fresh each process keeps the gauges it samples


@dataclass(frozen=True)
class Access:
    token: str | None  # the metrics_token, if set
    open_locally: bool  # False when a tunnel or a proxy brings clients in over loopback


ACCESS = web.AppKey("metrics_access", Access)
FIRST = web.AppKey("metrics_first_process", bool)  # keeps the child and the queue
_SEEN = web.AppKey("metrics_totals_seen", dict)  # running totals at the last sample


def setup_scrape(app: web.Application, *, token: str | None, relayed: bool,
                 first_process: bool) -> None:
    """The /metrics route. Call after setup_metrics and the features it samples. relayed: a
    tunnel or proxy on this host brings clients in over loopback."""
    app[ACCESS] = Access(token, open_locally=not relayed)
    app[FIRST] = first_process
    app[_SEEN] = {}
    app.router.add_get("/metrics", scrape)
    if app[METRICS].multiprocess:  # a scrape may reach any process: each keeps its own fresh
        app.cleanup_ctx.append(_sampling)


async def scrape(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    if not (access.open_locally and asked_locally(request)) and not token_matches(
            request, access.token):
        await authorize(request, ADMIN)
    metrics = request.app[METRICS]
    await sample(request.app)
    fetched = await fetch_all(request.app[HTTP_CLIENT], request.app[CATALOG].backends(),
                              metrics)
    return web.Response(body=metrics.render(fetched), headers={"Content-Type": CONTENT_TYPE})


def asked_locally(request: web.Request) -> bool:
    """This host asking directly, not a client relayed by a proxy on this host (which says so
    in one of these headers) nor a web page in a browser here (other host names, or marked
    as cross-site by the browser)."""
    if any(name in request.headers for name in RELAYED):
        return False
    if request.headers.get("Sec-Fetch-Site", "none") not in ("none", "same-origin"):
        return False
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    if host.strip("[]").lower() not in LOCAL_NAMES:
        return False
    return is_loopback(client_address(request))


def token_matches(request: web.Request, token: str | None) -> bool:
    if not token:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                             token.encode())


async def sample(app: web.Application) -> None:
    """Gauges read from the running parts. Redis's state is every process's own; the queue,
    the backends and the children are the first process's (workers borrow them)."""
    metrics = app[METRICS]
    limiter = app[LIMITER]
    metrics.redis_degraded.set(1 if limiter.degraded else 0)
    _count_up(app, metrics.limit_round_trips, "limit_round_trips", limiter.round_trips)
    if not app[FIRST]:
        return
    catalog = app[CATALOG]
    metrics.backends(catalog.backends())
    for model in catalog.models:
        name = model.id
        metrics.queue(name, await model.queue.stats())
        metrics.model(name, model.state, model.estimate_mib, model.measured_mib)
        for counter, key, total in (
                (metrics.model_loads.labels(name), "loads", model.loads),
                (metrics.model_load_seconds.labels(name), "load_seconds", model.load_seconds),
                (metrics.model_swap_waits.labels(name), "swap_waits", model.swap_waits),
                *((metrics.model_evictions.labels(name, why), f"evictions:{why}", n)
                  for why, n in model.evictions.items())):
            _count_up(app, counter, f"{key}:{name}", total)
        if model.supervisor is not None:
            child = model.supervisor.backend.name
            _count_up(app, metrics.child_restarts.labels(child), f"restarts:{child}",
                      model.supervisor.child.restarts)


def _count_up(app: web.Application, counter: Any, name: str, total: float) -> None:
    """A counter kept elsewhere as a running total: add what is new since the last look."""
    seen = app[_SEEN]
    if total > seen.get(name, 0):
        counter.inc(total - seen.get(name, 0))
    seen[name] = total


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """With --workers a scrape may reach any process (Prometheus keeps to one connection):
    each keeps what it samples fresh (the first, also the queue, backends and children)."""
    async def loop() -> None:
        while True:
            with contextlib.suppress(Exception):
                await sample(app)
            await asyncio.sleep(SAMPLE_EVERY)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def fetch_all(client: ClientSession, backends: list[Backend], metrics: Metrics
                    ) -> list[Metric]:
    found = await asyncio.gather(*(fetch_one(client, b, metrics) for b in backends))
    return [family for families in found for family in families]


async def fetch_one(client: ClientSession, backend: Backend, metrics: Metrics) -> list[Metric]:
    """One ready model server's /metrics, labelled with its name; nothing (counted) if it
    cannot answer now, nothing (not counted) if it has no metrics."""
    if backend.state is not State.READY:
        return []
    try:
        async with client.get(backend.url("/metrics"), headers=backend.auth_headers(),
                              timeout=ClientTimeout(total=FETCH_TIMEOUT)) as resp:
            if resp.status in (404, 501):  # no metrics there (llama-server without --metrics)
                return []
            resp.raise_for_status()
            text = await resp.text()
        return relabel(text, backend)
    except (ClientError, TimeoutError, ValueError) as exc:
        log.debug("metrics of backend %s: %s", backend.name, exc)
        metrics.upstream_scrape_errors.labels(backend.name).inc()
        return []

