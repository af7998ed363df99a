"""Typed application keys: every shared object the app holds, named once."""

from __future__ import annotations

from aiohttp import ClientSession, web

from config import Settings
from proxy.backends import BackendPool
from proxy.supervisor import LlamaSupervisor

SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ClientSession)
POOL = web.AppKey("pool", BackendPool)
SUPERVISOR: web.AppKey[LlamaSupervisor | None] = web.AppKey("supervisor")

REQUEST_ID = web.RequestKey("request_id", str)  # set by the request-id middleware
