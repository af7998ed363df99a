"""The backend pool: every model server the appliance can send a request to, its health, and
what can go wrong in reaching one.

A backend is either the supervised llama-server (its state set by the supervisor) or an
--upstream server (its state set by a periodic health check here).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from aiohttp import ClientError, ClientSession, ClientTimeout
from yarl import URL

from proxy.errors import OpenAIError

log = logging.getLogger("proxy.backends")


class ModelNotFound(Exception):
    def __init__(self, model: str | None) -> None:
        super().__init__(f"no model {model}")
        self.model = model


class ModelLoading(Exception):
    retry_after = 2


class NoBackend(Exception):
    """Every backend for the model is down or failed."""

    retry_after = 10

    def __init__(self, reasons: str) -> None:
        super().__init__(reasons)
        self.reasons = reasons


class UpstreamUnreachable(Exception):
    """The model server could not be reached at all; another one may be tried."""


class UpstreamTimeout(Exception):
    """The model server did not answer, or went silent, in time."""


class UpstreamBroke(Exception):
    """The model server broke off its answer."""


def upstream_error(exc: UpstreamTimeout | UpstreamBroke) -> OpenAIError:
    """A model server that failed mid-answer, as the client sees it (a stream's last event)."""
    if isinstance(exc, UpstreamTimeout):
        return OpenAIError(504, str(exc), code="upstream_timeout")
    return OpenAIError(502, str(exc), code="upstream_error")


class State(StrEnum):
    STARTING = "starting"  # loading, or waiting to restart after a crash
    READY = "ready"
    DOWN = "down"  # unreachable; health checks go on
    FAILED = "failed"  # gave up restarting; needs an operator
    STOPPED = "stopped"


@dataclass
class Backend:
    name: str
    base_url: str
    api_key: str | None = None
    models: tuple[str, ...] = ()
    state: State = State.STARTING
    reason: str | None = None
    supervised: bool = False  # the child's state belongs to its supervisor, not to the relay
    # Whether it is llama-server (its Server header says; None until it has answered).
    llama_cpp: bool | None = None
    changed: float = field(default_factory=time.monotonic)
    _urls: dict[str, tuple[str, URL]] = field(default_factory=dict, repr=False)

    @property
    def streams_keep_alive(self) -> bool:
        """llama-server closes its connection after a stream although it says keep-alive, so a
        stream to it (or to a server not yet known) asks for the close; others keep it (a new
        connection per stream costs a third of a stream's time)."""
        return self.llama_cpp is False

    def learn(self, headers: Mapping[str, str]) -> None:
        self.llama_cpp = "llama.cpp" in headers.get("Server", "")

    def set_state(self, state: State, reason: str | None = None) -> None:
        if state is not self.state:
            log.info("backend %s: %s -> %s%s", self.name, self.state, state,
                     f" ({reason})" if reason else "")
            self.changed = time.monotonic()
        self.state, self.reason = state, reason

    def url(self, path: str) -> URL:
        """Parsed once per path: yarl would parse the same string on every request."""
        cached = self._urls.get(path)
        if cached is None or cached[0] != self.base_url:  # the child's URL is set after start
            cached = self._urls[path] = (self.base_url, URL(self.base_url + path))
        return cached[1]

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def public(self) -> dict[str, object]:
        """What /health shows: no URLs or keys, as it needs no credential."""
        return {"name": self.name, "state": self.state.value, "models": list(self.models),
                "reason": self.reason}


class BackendPool:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self._turn = itertools.count()

    def model_ids(self) -> list[str]:
        return list(dict.fromkeys(m for b in self.backends for m in b.models))

    def serving(self, model: str | None) -> list[Backend]:
        """Backends that can answer for this model, in any state.

        An unknown or missing model goes to every backend when only one model is served: tools
        like aider send their own model names, and one local model is the common case.
        """
        named = [b for b in self.backends if model in b.models]
        if named or len(self.model_ids()) > 1:
            return named
        return list(self.backends)

    def choose(self, model: str | None) -> list[Backend]:
        """The ready backends for this model, in round-robin order, or why there are none.
        Decided before rate limits are charged, so a refused request costs the caller nothing."""
        candidates = self.serving(model)
        if not candidates:
            raise ModelNotFound(model)
        ready = self.ready(candidates)
        if ready:
            return ready
        if any(b.state is State.STARTING for b in candidates):
            raise ModelLoading
        raise NoBackend("; ".join(f"{b.name}: {b.reason or b.state}" for b in candidates))

    @staticmethod
    def served(model: str | None, backends: list[Backend]) -> str:
        """The model id that answers: the one asked for if a backend has it, else (any name
        goes to a lone model) that model's own id; never a caller's free-form string."""
        for backend in backends:
            if model in backend.models:
                return str(model)
        return next((m for b in backends for m in b.models), "")

    def ready(self, candidates: list[Backend]) -> list[Backend]:
        """The ready ones, rotated so load spreads round-robin."""
        up = [b for b in candidates if b.state is State.READY]
        if len(up) > 1:
            shift = next(self._turn) % len(up)
            up = up[shift:] + up[:shift]
        return up

    def status(self) -> str:
        states = [b.state for b in self.backends]
        if states and all(s is State.READY for s in states):
            return "ok"
        if State.READY in states:
            return "degraded"
        if State.STARTING in states:
            return "starting"
        return "down"


async def check_upstream(client: ClientSession, backend: Backend, limit: float,
                         starting_grace: float = 0.0) -> None:
    """Ask an upstream for its model list; that proves it is up and tells us its model ids.

    One that has never answered stays "starting" for starting_grace seconds (it may be loading,
    or be the first process's llama-server seen from a --workers process), then it is "down".
    """
    try:
        async with client.get(f"{backend.base_url}/v1/models", headers=backend.auth_headers(),
                              timeout=ClientTimeout(total=limit)) as resp:
            if resp.status != 200:
                raise ValueError(f"/v1/models answered {resp.status}")
            backend.learn(resp.headers)
            data = await resp.json(content_type=None)
        ids = tuple(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m)
        backend.models = ids or backend.models
        backend.set_state(State.READY)
    except (ClientError, TimeoutError, ValueError, AttributeError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        young = time.monotonic() - backend.changed < starting_grace
        if backend.state is State.STARTING and young:
            backend.set_state(State.STARTING, f"not answering yet ({reason})")
        else:
            backend.set_state(State.DOWN, reason)


async def watch_upstreams(client: ClientSession, backends: list[Backend], interval: float,
                          starting_grace: float) -> None:
    """Health-check every upstream forever (cancelled at shutdown)."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(check_upstream(client, b, min(interval, 5.0), starting_grace)
                               for b in backends))
