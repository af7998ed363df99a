"""The model catalog at run time: every model a request may name, which of them run, and when
they start and stop (app[CATALOG]).

A supervised model starts on the first request that needs it (all of them share the one start),
stops after `ttl` idle seconds, and is stopped to make room for another when `max_loaded` or
`memory_budget` would be exceeded: the least recently used first, and never one that a request
holds (waiting for it to start, queued for its slots, or in flight). A request that needs room
waits until a holder lets go, up to `room_timeout`. A start that fails is tried again on a later
request once its backoff has passed. Remote models (and --upstream servers) are never started or
stopped, only health-checked, and take turns (round robin).

Every await below is a place where a request can leave or another can come: a model chosen to
stop is marked first (`stopping`), so a request arriving meanwhile waits for the stop and starts
it again rather than being sent to a child on its way out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from config.catalog import ModelEntry
from proxy.runtime.child import Phase
from proxy.runtime.gguf import footprint_mib
from proxy.upstream.backends import Backend, ModelLoading, ModelNotFound, NoBackend, State
from proxy.upstream.supervisor import LlamaSupervisor
from quota.slots import FairQueue

log = logging.getLogger("proxy.catalog")

IDLE_CHECK_EVERY = 1.0
FIRST_BACKOFF, MAX_BACKOFF = 5.0, 60.0  # after a failed start, before the next try


class NoRoom(Exception):
    """No room to start a model: what runs is busy (or the model alone is over the budget)."""

    retry_after = 5


class Builder(Protocol):
    """Makes what the catalog runs (proxy/upstream/pool.py): a model from its entry, and a
    second child for a model being restarted."""

    def model(self, entry: ModelEntry) -> CatalogModel: ...

    def supervisor(self, entry: ModelEntry, name: str) -> LlamaSupervisor: ...


class Unloaded(Exception):
    """An operator's unload that cannot be done: requests hold the model, or it is remote."""

    def __init__(self, message: str, code: str = "model_busy") -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Hold:
    """One request's hold on a model: the queue its slot came from (if any) and the child
    generation it was sent to, so a restart knows when the old child has no one left."""

    model: CatalogModel
    queue: FairQueue | None
    generation: int


@dataclass(eq=False)
class CatalogModel:
    entry: ModelEntry
    backends: list[Backend]  # its child first when supervised, then its remote servers
    queue: FairQueue  # its slots (admission_slots wide, or its parallel)
    supervisor: LlamaSupervisor | None = None
    users: int = 0  # requests holding it: waiting for its start, queued, in flight
    last_used: float = field(default_factory=time.monotonic)
    last_used_at: float | None = None  # wall clock, for the admin API
    loaded_since: float | None = None  # wall clock, for the admin API
    estimate_mib: int = 0  # before it runs: file + KV cache + cache_ram
    measured_mib: int | None = None  # the child's RSS while it runs
    loads: int = 0
    load_seconds: float = 0.0
    failures: int = 0
    retry_at: float = 0.0  # a failed start is not tried again before this (monotonic)
    evictions: collections.Counter[str] = field(default_factory=collections.Counter)
    swap_waits: int = 0  # requests that waited for it to start
    placing: bool = False  # room was made for it and its child is being started
    stopping: asyncio.Event | None = None  # set once a stop under way is done
    generation: int = 0  # its child's: a restart moves new requests to the next one
    holders: collections.Counter[int] = field(default_factory=collections.Counter)
    restarting: bool = False  # a second child is starting beside the first
    _start: asyncio.Task[bool] | None = None
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def id(self) -> str:
        """Its name: the entry's id, or (upstreams alone) the first the servers report."""
        return self.entry.id or next((m for b in self.backends for m in b.models), "")

    def names(self) -> tuple[str, ...]:
        learned = tuple(m for b in self.backends for m in b.models)
        return tuple(dict.fromkeys((*self.entry.names(), *learned)))

    @property
    def child_name(self) -> str:
        return self.supervisor.backend.name if self.supervisor is not None else self.id

    @property
    def child(self) -> Backend | None:
        return self.supervisor.backend if self.supervisor is not None else None

    @property
    def running(self) -> bool:
        """Its child is up or on its way up (it counts against max_loaded and the budget)."""
        return self.supervisor is not None and (self.placing or self.supervisor.child.phase in (
            Phase.STARTING, Phase.READY))

    @property
    def state(self) -> str:
        """loaded, loading, unloaded or failed (what /v1/models and the admin API say)."""
        if self.supervisor is None:
            states = {b.state for b in self.backends}
            if State.READY in states:
                return "loaded"
            return "loading" if State.STARTING in states else "failed"
        phase = self.supervisor.child.phase
        if phase is Phase.READY and self.stopping is None:
            return "loaded"
        if phase is Phase.STARTING or self.placing:
            return "loading"
        if phase is Phase.FAILED or self.backing_off:
            return "failed"
        return "unloaded"

    @property
    def backing_off(self) -> bool:
        return bool(self.failures) and time.monotonic() < self.retry_at

    @property
    def footprint_mib(self) -> int:
        """What it counts against memory_budget: the estimate, or more once measured."""
        return max(self.estimate_mib, self.measured_mib or 0)

    def ready_backends(self) -> list[Backend]:
        """The servers that can answer now, rotated so load spreads round robin; a child on
        its way out is not one of them."""
        up = [b for b in self.backends
              if b.state is State.READY and not (b is self.child and self.stopping)]
        if len(up) > 1:
            shift = next(self._turn) % len(up)
            up = up[shift:] + up[:shift]
        return up

    def measure(self) -> None:
        pid = self.supervisor.child.pid if self.supervisor is not None else None
        self.measured_mib = rss_mib(pid) if pid and self.running else None

    def used(self) -> None:
        self.last_used, self.last_used_at = time.monotonic(), time.time()

    def public(self) -> dict[str, Any]:
        """/health's row: no URLs, keys or log lines (it needs no credential)."""
        return {"id": self.id, "state": self.state, "aliases": list(self.entry.aliases),
                "supervised": self.supervisor is not None, "reason": self._reason()}

    def admin(self) -> dict[str, Any]:
        """The admin API's row."""
        tail = list(self.supervisor.child.tail)[-10:] if self.supervisor is not None else []
        return {**self.public(), "preload": self.entry.preload,
                "loaded_since": self.loaded_since, "last_used": self.last_used_at,
                "idle_seconds": round(time.monotonic() - self.last_used, 1),
                "in_use": self.users, "estimated_mib": self.estimate_mib,
                "measured_mib": self.measured_mib, "loads": self.loads,
                "load_seconds": round(self.load_seconds, 2), "failures": self.failures,
                "retry_in": round(self.retry_at - time.monotonic(), 1) if self.backing_off
                else None, "evictions": dict(self.evictions), "ttl": self.entry.ttl,
                "last_output": tail if self.state == "failed" else []}

    def _reason(self) -> str | None:
        reasons = [f"{b.name}: {b.reason}" for b in self.backends if b.reason]
        return "; ".join(reasons) or None


class Catalog:
    def __init__(self, models: list[CatalogModel], *, max_loaded: int, memory_budget: int,
                 room_timeout: float, drain_timeout: float = 30.0,
                 builder: Builder | None = None) -> None:
        self.models = models
        self.builder = builder
        self.drain_timeout = drain_timeout  # how long a replaced child's requests may run
        self._background: set[asyncio.Task[None]] = set()
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget
        self.room_timeout = room_timeout
        self._room = asyncio.Lock()  # one placement decision (and one stop for it) at a time
        self._freed = asyncio.Event()  # set (and replaced) when a holder lets go, a model
        # stops or a start ends: someone waiting for room looks again
        self._idle: asyncio.Task[None] | None = None

    # -- which model a request names ---------------------------------------------------
    def find(self, name: str | None) -> CatalogModel:
        """The model a request names (its id or an alias; no name: the first). With one model
        (of one id), any name reaches it: tools like aider send their own model names."""
        if not name:
            return self.models[0]
        for model in self.models:  # the catalog's own names first, then what servers report
            if name in model.entry.names():
                return model
        for model in self.models:
            if name in model.names():
                return model
        if len(self.models) == 1 and len(self.model_ids()) <= 1:
            return self.models[0]
        raise ModelNotFound(name)

    def served(self, name: str | None) -> str:
        """The model id that answers: the id asked for if its servers report it (an upstream
        may serve several), else the model's own id (for an alias, or any name a lone model
        takes); never a caller's free-form string."""
        model = self.find(name)
        learned = {m for b in model.backends for m in b.models}
        return name if name and name in learned else model.id

    def model_ids(self) -> list[str]:
        """The ids to list: each entry's, and those a pool of upstreams reports, once each."""
        return [m for m in dict.fromkeys(
            m for model in self.models for m in (model.id, *(m for b in model.backends
                                                             for m in b.models))) if m]

    def backends(self) -> list[Backend]:
        return [b for model in self.models for b in model.backends]

    # -- using a model ---------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, model: CatalogModel, who: str, slot: bool
                  ) -> AsyncIterator[Backend | None]:
        """Hold the model for one request: started if it must be (never stopped while held),
        then one of its slots (slot=False: none, e.g. a token count). Yields None: the
        model's ready servers are the ones to use (a worker's borrower names a child)."""
        hold = await self.enter(model, who, slot)
        try:
            yield None
        finally:
            self.leave(hold)

    async def enter(self, model: CatalogModel, who: str, slot: bool) -> Hold:
        """use() in two halves, for the slot lender. Nothing awaits after the slot is granted,
        so a cancel lands in the queue, which passes it on."""
        model.users += 1
        try:
            await self.ready(model)
            queue = model.queue if slot and model.queue.slots > 0 else None
            if queue is not None:
                await queue.acquire(who)
        except BaseException:
            self._let_go(model)
            raise
        hold = Hold(model, queue, model.generation)
        model.holders[hold.generation] += 1
        return hold

    def leave(self, hold: Hold) -> None:
        if hold.queue is not None:
            hold.queue.release()
        hold.model.holders[hold.generation] -= 1
        if not hold.model.holders[hold.generation]:
            self._notify()  # a replaced child may be waiting for its last request
        self._let_go(hold.model)

    def _let_go(self, model: CatalogModel) -> None:
        model.users -= 1
        model.used()
        if not model.users:
            self._notify()

    def refuse_early(self, model: CatalogModel) -> None:
        """What is refused before rate limits are charged: a model none of whose servers is
        up that cannot be started, or whose start failed, within its backoff."""
        if model.ready_backends():
            return
        if model.supervisor is None or (model.backing_off and not model.running):
            _raise_unavailable(model)

    async def ready(self, model: CatalogModel) -> None:
        """Until the model can answer: started (or its start joined) and ready, or why not.
        --upstream servers beside a child answer while the child is down."""
        if model.ready_backends():
            return
        if model.supervisor is None:
            _raise_unavailable(model)
        while model.stopping is not None:  # chosen to stop before this request came
            await model.stopping.wait()
        if model.ready_backends():
            return
        start = self.start(model)
        model.swap_waits += 1
        try:  # the start goes on for those who come later; room is bounded inside it
            async with asyncio.timeout(model.entry.startup_timeout or None):
                await asyncio.shield(start)
        except TimeoutError:
            raise ModelLoading(f"The model `{model.id}` is still loading; retry shortly"
                               ) from None
        if not model.ready_backends():
            _raise_unavailable(model)

    def start(self, model: CatalogModel) -> asyncio.Task[bool]:
        """The model's start, begun now or joined; a start that failed is tried again only
        once its backoff has passed."""
        if model._start is not None and not model._start.done():
            return model._start
        if model.running:  # a preloaded child still loading, or restarting after a crash
            model._start = asyncio.create_task(self._settled(model))
        else:
            if model.backing_off:
                _raise_unavailable(model)
            model._start = asyncio.create_task(self._load(model), name=f"load {model.id}")
        model._start.add_done_callback(_retrieved)  # every waiter may have left
        return model._start

    async def load(self, model: CatalogModel) -> None:
        """An operator's load: as a request's, without a slot."""
        async with self.use(model, "admin", slot=False):
            pass

    async def unload(self, model: CatalogModel) -> None:
        """An operator's unload: refused while requests hold the model."""
        if model.supervisor is None:
            raise Unloaded(f"The model `{model.id}` is served elsewhere; nothing to unload",
                           "model_not_local")
        async with self._room:  # not in the middle of a placement that counts on it
            if model.users or model.placing:
                raise Unloaded(f"The model `{model.id}` is in use by {model.users} requests;"
                               " not unloaded")
            if model.running and model.stopping is None:
                await self._stop(model, "unload")

    # -- restart and reload, with no downtime -----------------------------------------------
    async def restart(self, model: CatalogModel, entry: ModelEntry | None = None) -> None:
        """A second child comes up healthy first (counted against the caps: only idle models
        make room for it), takes the saved slots, then new requests go to it; requests on the
        old one finish there (up to drain_timeout) before it stops. A model not running takes
        the new settings at its next start."""
        entry = entry or model.entry
        if model.supervisor is None or self.builder is None:
            raise Unloaded(f"The model `{model.id}` is served elsewhere; nothing to restart",
                           "model_not_local")
        if model.restarting:
            raise Unloaded(f"The model `{model.id}` is already being restarted")
        if not model.running or model.stopping is not None or model.state != "loaded":
            self._replace(model, entry, self.builder.supervisor(entry, model.child_name))
            return
        model.restarting = True
        try:
            new = await self._second_child(model, entry)
        except BaseException:
            model.restarting = False
            self._notify()
            raise
        old, generation = model.supervisor, model.generation
        await old.save_slots()
        await new.restore_slots()
        self._replace(model, entry, new)
        model.generation += 1
        log.info("model %s: restarted; the old child finishes its requests", model.id)
        self._run(self._retire_child(model, old, generation))

    async def _second_child(self, model: CatalogModel, entry: ModelEntry) -> LlamaSupervisor:
        assert self.builder is not None
        await self._place(model)
        try:
            new = self.builder.supervisor(entry, model.child_name)
            log.info("model %s: starting a second child for a restart", model.id)
            if await new.start(wait=True):
                return new
            await new.stop()
            raise NoBackend(f"{model.child_name}: the new child did not start "
                            f"({new.child.reason}); the old one goes on")
        finally:
            model.placing = False

    def _replace(self, model: CatalogModel, entry: ModelEntry, new: LlamaSupervisor) -> None:
        model.entry, model.supervisor = entry, new
        model.backends[0] = new.backend
        model.estimate_mib = estimate(entry)
        if new.child.phase is not Phase.READY:
            model.loaded_since = None

    async def _retire_child(self, model: CatalogModel, old: LlamaSupervisor,
                            generation: int) -> None:
        """Stop a replaced child once the requests sent to it are done (or past the drain)."""
        deadline = time.monotonic() + self.drain_timeout
        while model.holders[generation] > 0 and time.monotonic() < deadline:
            freed = self._freed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), deadline - time.monotonic())
        await old.stop()
        del model.holders[generation]
        model.restarting = False
        self._notify()

    async def reload(self, entries: tuple[ModelEntry, ...]) -> dict[str, list[str]]:
        """The catalog as the config file now says: added models available at once, removed
        ones gone for new requests and stopped once their requests are done, changed ones
        restarted as above, the others, and their streams, untouched."""
        assert self.builder is not None
        now = {m.entry.id: m for m in self.models}
        done: dict[str, list[str]] = {"added": [], "removed": [], "changed": [],
                                      "unchanged": []}
        models, changed = [], []
        for entry in entries:
            model = now.pop(entry.id, None)
            if model is None:
                model = self.builder.model(entry)
                done["added"].append(entry.id)
            elif model.entry == entry:
                done["unchanged"].append(entry.id)
            else:
                changed.append((model, entry))
                done["changed"].append(entry.id)
            models.append(model)
        self.models = models
        for model in now.values():
            done["removed"].append(model.entry.id)
            self._run(self._retire_model(model))
        for model, entry in changed:
            if model.supervisor is None or entry.gguf is None:  # remote, or turned remote
                self._run(self._retire_model(model))
                self.models[self.models.index(model)] = self.builder.model(entry)
            else:
                await self.restart(model, entry)
        log.info("catalog reloaded: %s", "; ".join(f"{k} {', '.join(v) or 'none'}"
                                                    for k, v in done.items()))
        return done

    async def _retire_model(self, model: CatalogModel) -> None:
        """A model no longer in the catalog: stopped once its requests are done."""
        deadline = time.monotonic() + self.drain_timeout
        while model.users and time.monotonic() < deadline:
            freed = self._freed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), deadline - time.monotonic())
        if model.supervisor is not None and model.running:
            await self._stop(model, "removed")

    def _run(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieved)

    async def admin(self) -> dict[str, Any]:
        """The admin API's view: each model and its queue, and what runs against the caps."""
        running = [m for m in self.models if m.running]
        return {"models": [{**m.admin(), "queue": await m.queue.stats()} for m in self.models],
                "max_loaded": self.max_loaded, "memory_budget": self.memory_budget,
                "running": len(running), "memory_mib": sum(m.footprint_mib for m in running)}

    async def public(self) -> dict[str, Any]:
        """/health's view: each model's state and queue, and whether the appliance serves."""
        return {"models": [{**m.public(), "queue": await m.queue.stats()} for m in self.models],
                "backends": [b.public() for b in self.backends()], "status": self.status()}

    # -- starting and stopping ------------------------------------------------------------
    async def _load(self, model: CatalogModel) -> bool:
        assert model.supervisor is not None
        await self._place(model)
        began = time.monotonic()
        log.info("model %s: starting (%d MiB estimated)", model.id, model.estimate_mib)
        try:
            ok = await model.supervisor.start(wait=True)
        except Exception as exc:  # e.g. its key file cannot be written: a failed start too
            log.exception("model %s: could not be started", model.id)
            model.supervisor.backend.set_state(State.FAILED, f"could not be started ({exc})")
            ok = False
        finally:
            model.placing = False
            self._notify()  # a start that ended makes a model idle, or frees its room
        if ok:
            restored = await model.supervisor.restore_slots()
            if restored:
                log.info("model %s: %d tokens of its saved slots restored", model.id, restored)
            self._counted(model)
            model.load_seconds += time.monotonic() - began
            model.failures = 0
            model.used()
            log.info("model %s: loaded in %.2fs", model.id, time.monotonic() - began)
        elif model.supervisor.child.phase is not Phase.STOPPED:  # not stopped at shutdown
            self._failed(model)
        return ok

    async def _settled(self, model: CatalogModel) -> bool:
        assert model.supervisor is not None
        phase = await model.supervisor.child.settled()
        self._counted(model)
        return phase is Phase.READY

    def _counted(self, model: CatalogModel) -> None:
        """A start the catalog did not make (preload, a restart after a crash), once up."""
        if model.supervisor is not None and model.supervisor.child.phase is Phase.READY \
                and model.loaded_since is None:
            model.loads, model.loaded_since = model.loads + 1, time.time()

    def _failed(self, model: CatalogModel) -> None:
        model.failures += 1
        backoff = min(FIRST_BACKOFF * 2 ** (model.failures - 1), MAX_BACKOFF)
        model.retry_at = time.monotonic() + backoff
        log.error("model %s: start failed (%s); tried again on a request after %.0fs",
                  model.id, model.supervisor.child.reason if model.supervisor else "", backoff)

    async def _place(self, model: CatalogModel) -> None:
        """Make room for the model: stop idle models, least recently used first, until it
        fits; when none is idle, wait (not holding the room) for a holder to let go, up to
        room_timeout."""
        if self.memory_budget and model.estimate_mib > self.memory_budget:
            raise NoRoom(f"The model `{model.id}` needs about {model.estimate_mib} MiB, more than "
                         f"the memory budget of {self.memory_budget} MiB")
        deadline = time.monotonic() + self.room_timeout
        while True:
            freed = self._freed
            async with self._room:
                while not self._fits(model) and (idle := self._idle_models(model)):
                    await self._stop(idle[0], "room")
                if self._fits(model):
                    model.placing = True  # counts against the caps from now on
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                busy = ", ".join(m.id for m in self.models if m.running)
                raise NoRoom(f"No room to load `{model.id}`: the models running ({busy}) are "
                             "all in use; retry shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), left)

    def _idle_models(self, model: CatalogModel) -> list[CatalogModel]:
        """Models that may be stopped for room: up, unheld, not already stopping (a start
        under way finishes first; then it is idle), least recently used first."""
        return sorted((m for m in self.models if m is not model and _stoppable(m)),
                      key=lambda m: m.last_used)

    def _fits(self, model: CatalogModel) -> bool:
        """Room for one more child of this model (a start, or a restart's second child)."""
        running = [m for m in self.models if m.running and (m is not model or m.restarting)]
        children = len(running) + sum(1 for m in running if m.restarting and m is not model)
        if self.max_loaded and children + 1 > self.max_loaded:
            return False
        used = sum(m.footprint_mib + (m.estimate_mib if m.restarting and m is not model else 0)
                   for m in running)
        return not self.memory_budget or used + model.estimate_mib <= self.memory_budget

    async def _stop(self, model: CatalogModel, reason: str) -> None:
        assert model.supervisor is not None
        log.info("model %s: stopping (%s)", model.id, reason)
        model.evictions[reason] += 1
        model.stopping = stopped = asyncio.Event()  # before any await: see the module's note
        try:
            if model.supervisor.child.phase is Phase.READY:
                saved = await model.supervisor.save_slots()
                if saved:
                    log.info("model %s: %d tokens of its slots saved", model.id, saved)
            await model.supervisor.stop()
        finally:
            model.stopping = None
            stopped.set()
            model.loaded_since, model.measured_mib = None, None
            self._notify()

    def _notify(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    # -- the catalog's life ---------------------------------------------------------------
    async def preload(self) -> None:
        """Start the models marked preload, without waiting, as far as the caps allow (their
        restarts after a crash are their supervisor's)."""
        for model in self.models:
            if model.supervisor is None or not model.entry.preload:
                continue
            if not self._fits(model):
                log.warning("model %s: not preloaded: max_loaded or memory_budget is reached",
                            model.id)
                continue
            await model.supervisor.start()
            model._start = asyncio.create_task(self._settled(model))
            model._start.add_done_callback(_retrieved)

    def watch(self) -> None:
        self._idle = asyncio.create_task(self._watch_idle(), name="catalog idle")

    async def close(self) -> None:
        tasks = [t for t in (self._idle, *self._background, *(m._start for m in self.models))
                 if t is not None]
        for task in tasks:  # no start may begin while the children stop
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(m.supervisor.stop() for m in self.models
                               if m.supervisor is not None))

    async def _watch_idle(self) -> None:
        """Measure what runs; stop what sat idle past its ttl. Never ends on an error."""
        while True:
            await asyncio.sleep(IDLE_CHECK_EVERY)
            try:
                await self._idle_pass()
            except Exception:
                log.exception("the catalog's idle check failed; it goes on")

    async def _idle_pass(self) -> None:
        for model in self.models:
            model.measure()
            self._counted(model)
            ttl = model.entry.ttl or 0
            if not ttl or not _stoppable(model) or self._room.locked():
                continue
            async with self._room:  # checked again: a request may have come meanwhile
                if _stoppable(model) and time.monotonic() - model.last_used >= ttl:
                    await self._stop(model, "idle")

    def status(self) -> str:
        """ok: every model can answer now or be started; degraded: some; starting: the only
        ones are loading at start-up; down: none can."""
        states = [_serving(m) for m in self.models]
        if all(s == "up" for s in states):
            return "ok"
        if "up" in states or "partly" in states:
            return "degraded"
        return "starting" if "loading" in states else "down"


def _stoppable(model: CatalogModel) -> bool:
    return (model.state == "loaded" and not model.users and not model.placing
            and model.stopping is None)


def _serving(model: CatalogModel) -> str:
    """up, partly (some of its servers down), loading (a preloaded model starting) or down."""
    states = [b.state for b in model.backends if b is not model.child]
    if model.supervisor is not None:
        child = {"up": State.READY, "loading": State.STARTING}.get(_child(model), State.DOWN)
        states.append(child)
    if all(s is State.READY for s in states):
        return "up"
    if State.READY in states:
        return "partly"
    return "loading" if State.STARTING in states else "down"


def _child(model: CatalogModel) -> str:
    """Whether a model run here can serve: up (loaded, or started on demand: a request waits
    for its start), loading (a preloaded one starting: not ready yet), or down (a preloaded
    one that gave up, or a start within its backoff)."""
    state = model.state
    if state == "loading" and model.entry.preload:
        return "loading"
    if state == "failed" and (model.entry.preload or model.backing_off):
        return "down"
    return "up"


def _raise_unavailable(model: CatalogModel) -> None:
    """Why the model cannot answer now: loading (retry soon) or failed (after its backoff)."""
    if model.state == "loading":
        raise ModelLoading(f"The model `{model.id}` is loading; retry shortly")
    reasons = "; ".join(f"{b.name}: {b.reason or b.state}" for b in model.backends)
    error = NoBackend(reasons)
    if model.backing_off:
        error.retry_after = max(1, round(model.retry_at - time.monotonic()))
    raise error


def _retrieved(task: asyncio.Task[bool]) -> None:
    if not task.cancelled():
        task.exception()


def rss_mib(pid: int) -> int | None:
    """A process's resident memory in MiB (Linux), None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate(entry: ModelEntry) -> int:
    if entry.gguf is None:
        return 0
    return footprint_mib(entry.gguf, entry.ctx_size or 0, entry.cache_ram or 0,
                         parallel=entry.parallel or 1)
