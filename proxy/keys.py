"""Typed application and request keys: every shared object the app holds, named once."""

from __future__ import annotations

from aiohttp import ClientSession, web
from redis.asyncio import Redis

from auth.apikeys import KeyStore
from auth.authenticator import Authenticator
from auth.guard import FailureGuard
from auth.principal import Principal
from auth.ratelimit import Admission, RateLimiter
from config import Settings
from proxy.admission import SlotQueue
from proxy.backends import BackendPool
from proxy.drain import Drain
from proxy.supervisor import LlamaSupervisor

SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ClientSession)
POOL = web.AppKey("pool", BackendPool)
SUPERVISOR: web.AppKey[LlamaSupervisor | None] = web.AppKey("supervisor")
REDIS = web.AppKey("redis", Redis)
KEYS = web.AppKey("keys", KeyStore)
AUTH = web.AppKey("auth", Authenticator)
GUARD = web.AppKey("guard", FailureGuard)
LIMITER = web.AppKey("limiter", RateLimiter)
QUEUE: web.AppKey[SlotQueue] = web.AppKey("queue")
DRAIN = web.AppKey("drain", Drain)

REQUEST_ID = web.RequestKey("request_id", str)  # set by the request-id middleware
PRINCIPAL = web.RequestKey("principal", Principal)  # set by the auth middleware
ADMISSION = web.RequestKey("admission", Admission)  # set when rate limits apply
OPEN_STREAM = web.RequestKey("open_stream", web.StreamResponse)  # set once a stream starts
