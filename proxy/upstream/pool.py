"""The model servers this appliance sends requests to, as its catalog (app[CATALOG]): a
llama-server child for each model run here, the remote servers of the others and the --upstream
servers, health-checked while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator

from aiohttp import ClientSession, web

from config import Settings
from config.catalog import ModelEntry
from proxy.upstream.backends import Backend, State, check_upstream, watch_upstreams
from proxy.upstream.catalog import Catalog, CatalogModel, estimate
from proxy.upstream.relay import HTTP_CLIENT
from proxy.upstream.supervisor import LlamaSupervisor, hold_data_dir, release_data_dir
from quota.slots import FairQueue

CATALOG = web.AppKey("catalog", Catalog)


def setup_backends(app: web.Application, *, settings: Settings, lent: bool) -> None:
    """lent: an extra --workers process, whose models the first process starts, stops and
    queues for (their servers are reached directly, never health-checked from here). Call
    after setup_relay (the health checks use its HTTP client)."""
    app.cleanup_ctx.append(functools.partial(_backends, settings, lent))


def slots_for(entry: ModelEntry, admission_slots: int) -> int:
    """A model's queue width: admission_slots (-1: the model's parallel, if known)."""
    return admission_slots if admission_slots >= 0 else entry.parallel or 0


class Builder:
    """Makes the catalog's models and children from entries (at start, on a reload, for a
    restart). Each child gets a key file of its own, never reused while the appliance runs."""

    def __init__(self, settings: Settings, client: ClientSession, lent: bool) -> None:
        self.settings = settings
        self.client = client
        self.lent = lent
        self._children = itertools.count()

    def supervisor(self, entry: ModelEntry, name: str) -> LlamaSupervisor:
        child = Backend(name, "", models=(entry.id,), supervised=True, llama_cpp=True,
                        state=State.STOPPED)
        return LlamaSupervisor(self.settings, entry, next(self._children), self.client, child)

    def model(self, entry: ModelEntry) -> CatalogModel:
        first = self.settings.models and entry is self.settings.models[0]
        supervisor, backends = None, []
        if entry.supervised and not self.lent:
            supervisor = self.supervisor(
                entry, "llama-server" if first else f"llama-server:{entry.id}")
            backends.append(supervisor.backend)
        # In a worker a model of the first process's is its child's address: the first
        # process knows its state and grants a slot only when it is up. A pool of --upstream
        # servers that name their own models is health-checked here too, to learn them.
        borrowed = self.lent and bool(entry.id)
        for number, url in enumerate(entry.urls, 1):
            name = f"upstream-{number}" if first else f"{entry.id}-{number}"
            backend = Backend(name, url, entry.api_key, models=(entry.id,) if entry.id else (),
                              supervised=borrowed, learns=not entry.id)
            if borrowed:
                backend.set_state(State.READY)
            backends.append(backend)
        s = self.settings
        queue = FairQueue(slots_for(entry, s.admission_slots), s.queue_max, s.queue_timeout)
        return CatalogModel(entry, backends, queue, supervisor, estimate_mib=estimate(entry))


def build(settings: Settings, client: ClientSession, lent: bool) -> Catalog:
    builder = Builder(settings, client, lent)
    return Catalog([builder.model(entry) for entry in settings.models],
                   max_loaded=settings.max_loaded, memory_budget=settings.memory_budget,
                   room_timeout=settings.queue_timeout, drain_timeout=settings.shutdown_grace,
                   builder=builder)


async def _backends(settings: Settings, lent: bool, app: web.Application
                    ) -> AsyncIterator[None]:
    client = app[HTTP_CLIENT]
    catalog = build(settings, client, lent)
    lock = None
    if any(m.supervisor is not None for m in catalog.models):
        lock = hold_data_dir(settings.data_dir)
    remotes = [b for b in catalog.backends() if not b.supervised]  # at start; the watcher
    # looks at the catalog's every round (a reload may add or remove servers)
    grace, interval = settings.startup_timeout, settings.health_interval
    # One check before serving, so /v1/models knows the upstreams' model ids.
    await asyncio.gather(*(check_upstream(client, b, settings.connect_timeout, grace)
                           for b in remotes))
    app[CATALOG] = catalog
    watcher = asyncio.create_task(watch_upstreams(
        client, lambda: [b for b in catalog.backends() if not b.supervised], interval, grace))
    try:
        await catalog.preload()
        catalog.watch()
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await catalog.close()
        release_data_dir(lock)
