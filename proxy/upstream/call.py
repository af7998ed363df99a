"""One request to a model, the same value for every API that reaches one (/v1, /api/chat): who
asks, which model of the catalog, the path it goes to and whether its answer streams. Built
once per request (proxy/api/routes.py, model_call); the access room admits it and gives it a slot,
the relay sends it. The request id and the outcome are the request's own, read from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from auth.principal import Principal
from proxy.edge.ids import REQUEST_ID
from proxy.observe.outcome import Outcome, outcome_of
from proxy.upstream.apis import Api, api_of
from proxy.upstream.backends import Backend
from proxy.upstream.catalog import CatalogModel


@dataclass(slots=True)
class ModelCall:
    request: web.Request
    principal: Principal
    path: str  # the model server's path, e.g. /v1/chat/completions
    stream: bool  # the client's answer is a stream
    model: CatalogModel  # the catalog's model it names
    backends: list[Backend] = field(default_factory=list)  # ready ones, in the order to try
    # them: known once the model is up (access room's model_slot)
    outcome: Outcome = field(init=False)  # the request's, taken once
    api: Api = field(init=False)  # what the path's API needs (slot, cap, usage), looked up once

    def __post_init__(self) -> None:
        self.outcome = outcome_of(self.request)
        self.api = api_of(self.path)

    @property
    def request_id(self) -> str:
        return self.request.get(REQUEST_ID, "")
