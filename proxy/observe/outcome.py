"""What one request did: filled in by each layer as it goes (authentication, the limits, the
queue, the relay) and read once when the request ends, by the access log line, the metrics and
the usage ledger. Observers registered with `on_finished` see every finished request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("proxy.outcome")


@dataclass(slots=True)
class Outcome:
    started: float = field(default_factory=time.perf_counter)
    principal: str = ""  # "key:3f9a0c1d", "user:alice": never a secret
    credential: str = "none"  # the principal's kind: jwt, apikey, admin, dev, anonymous
    model: str = ""  # the model that served (or would have served) it
    backend: str = ""  # the model server that answered
    limit: str = ""  # "": no limits applied; "ok"; else the window that refused
    queue_wait: float | None = None  # seconds waited for a model slot
    first_token: float | None = None  # seconds from the start to the first streamed chunk
    prompt_tokens: int | None = None  # set once a model request ends (real usage)
    completion_tokens: int | None = None
    stream: bool = False
    auth_failure: str = ""  # why the credential was refused (missing, invalid, expired, ...)
    queue_refused: str = ""  # full, timeout, closed
    upstream_errors: list[tuple[str, str]] = field(default_factory=list)  # (backend, kind)
    disconnect: str = ""  # gone (the client left), write_timeout (it stopped reading)
    status: int = 0
    duration: float = 0.0

    @property
    def metered(self) -> bool:
        """A model request that was let through and sent to a model server (its usage counts,
        zero if it failed before the model answered)."""
        return self.prompt_tokens is not None


Observer = Callable[[web.Request, Outcome], None]
OUTCOME = web.RequestKey("outcome", Outcome)
OBSERVERS: web.AppKey[list[Observer]] = web.AppKey("finish_observers", list)


def on_finished(app: web.Application, observer: Observer) -> None:
    """Call observer(request, outcome) as each request ends; it must not block or raise."""
    app.setdefault(OBSERVERS, []).append(observer)


def outcome_of(request: web.Request) -> Outcome:
    """The request's outcome (a detached one if the edge did not start one: in unit tests)."""
    found = request.get(OUTCOME)
    return found if found is not None else Outcome()


def finished(request: web.Request, outcome: Outcome) -> None:
    for observer in request.app.get(OBSERVERS, ()):
        try:
            observer(request, outcome)
        except Exception:  # an observer's bug must not turn into a failed request
            log.exception("a finished-request observer failed")
