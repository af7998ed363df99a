"""The model servers this appliance sends requests to, as its catalog (app[CATALOG]): a
llama-server child for each model run here, the remote servers of the others and the --upstream
servers, health-checked while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
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


def build(settings: Settings, client: ClientSession, lent: bool) -> Catalog:
    models = []
    for index, entry in enumerate(settings.models):
        supervisor, backends = None, []
        if entry.supervised and not lent:
            child = Backend("llama-server" if index == 0 else f"llama-server:{entry.id}", "",
                            models=(entry.id,), supervised=True, llama_cpp=True,
                            state=State.STOPPED)
            supervisor = LlamaSupervisor(settings, entry, index, client, child)
            backends.append(child)
        # In a worker a model of the first process's is its child's address: the first
        # process knows its state and grants a slot only when it is up. A pool of --upstream
        # servers that name their own models is health-checked here too, to learn them.
        borrowed = lent and bool(entry.id)
        for number, url in enumerate(entry.urls, 1):
            name = f"upstream-{number}" if index == 0 else f"{entry.id}-{number}"
            backend = Backend(name, url, entry.api_key, models=(entry.id,) if entry.id else (),
                              supervised=borrowed, learns=not entry.id)
            if borrowed:
                backend.set_state(State.READY)
            backends.append(backend)
        queue = FairQueue(slots_for(entry, settings.admission_slots), settings.queue_max,
                          settings.queue_timeout)
        models.append(CatalogModel(entry, backends, queue, supervisor,
                                   estimate_mib=estimate(entry)))
    return Catalog(models, max_loaded=settings.max_loaded, memory_budget=settings.memory_budget,
                   room_timeout=settings.queue_timeout)


async def _backends(settings: Settings, lent: bool, app: web.Application
                    ) -> AsyncIterator[None]:
    client = app[HTTP_CLIENT]
    catalog = build(settings, client, lent)
    lock = None
    if any(m.supervisor is not None for m in catalog.models):
        lock = hold_data_dir(settings.data_dir)
    remotes = [b for b in catalog.backends() if not b.supervised]
    grace, interval = settings.startup_timeout, settings.health_interval
    # One check before serving, so /v1/models knows the upstreams' model ids.
    await asyncio.gather(*(check_upstream(client, b, settings.connect_timeout, grace)
                           for b in remotes))
    app[CATALOG] = catalog
    watcher = (asyncio.create_task(watch_upstreams(client, remotes, interval, grace))
               if remotes else None)
    try:
        await catalog.preload()
        catalog.watch()
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await catalog.close()
        release_data_dir(lock)
