"""The backend pool: every model server the appliance can send a request to, its health, and
what can go wrong in reaching one.

A backend is either the supervised llama-server (its state set by the supervisor) or an
--upstream server (its state set by a periodic health check here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
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
    learns: bool = True  # takes its model ids from the server (a catalog entry's are its own)
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
        if backend.learns:
            backend.models = ids or backend.models
        backend.set_state(State.READY)
    except (ClientError, TimeoutError, ValueError, AttributeError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        young = time.monotonic() - backend.changed < starting_grace
        if backend.state is State.STARTING and young:
            backend.set_state(State.STARTING, f"not answering yet ({reason})")
        else:
            backend.set_state(State.DOWN, reason)


async def watch_upstreams(client: ClientSession, backends: Callable[[], list[Backend]],
                          interval: float, starting_grace: float) -> None:
    """Health-check every upstream forever (cancelled at shutdown); backends() says which,
    each round."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(check_upstream(client, b, min(interval, 5.0), starting_grace)
                               for b in backends()))
