"""The application factory: settings in, a wired aiohttp app out. Each feature sets itself up
(its app keys, middleware and clean-up) from the values it needs; the order of the calls is the
order of the middlewares and of start-up (clean-up runs in reverse)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

from auth.tokens import TokenVerifier, issue_token
from config import Settings
from config.loader import is_loopback
from proxy.access.authn import setup_auth
from proxy.access.limits import setup_quota
from proxy.api.admin import setup_admin
from proxy.api.chat import ChatLimits, setup_chat
from proxy.api.ledger import setup_ledger
from proxy.api.metrics import Metrics, setup_metrics
from proxy.api.models import setup_models
from proxy.api.openapi import setup_openapi
from proxy.api.page import setup_page
from proxy.api.routes import setup_routes
from proxy.api.scrape import setup_scrape
from proxy.edge.cors import setup_cors
from proxy.edge.forwarded import TrustedProxies, setup_forwarded
from proxy.front import setup_front
from proxy.observe.logs import register_secret
from proxy.state.files import prepare_data_dir
from proxy.state.store import setup_store
from proxy.upstream.apis import ROOT_PATHS
from proxy.upstream.pool import setup_backends, slots_for
from proxy.upstream.relay import Timeouts, setup_relay
from quota.windows import Limits

ShutdownHook = Callable[[web.Application], Awaitable[None]]


def limits_of(settings: Settings) -> Limits:
    return Limits(rpm=settings.limit_rpm, rpd=settings.limit_rpd, tpm=settings.limit_tpm,
                  concurrency=settings.limit_concurrency, ip_rpm=settings.limit_ip_rpm,
                  window_s=settings.limit_window)


def trusted_proxies(settings: Settings) -> TrustedProxies:
    return TrustedProxies(settings.trusted_proxies, loopback=settings.trust_loopback_proxy)


def create_app(settings: Settings, slots_from: Path | None = None,
               on_shutdown: Sequence[ShutdownHook] = ()) -> web.Application:
    """slots_from: an extra --workers process borrows the models from the first one.
    on_shutdown: run after this process's requests have drained (the workers', say)."""
    s = settings
    for secret in (s.upstream_api_key, s.admin_key, s.jwt_secret, s.redis_url,
                   s.ngrok_authtoken, s.metrics_token):
        register_secret(secret)
    for entry in s.models:  # a remote model's key: never in a log line or an error body
        register_secret(entry.api_key)
    prepare_data_dir(s.data_dir)
    app = web.Application(client_max_size=s.max_body_bytes)
    setup_front(app, shutdown_grace=s.shutdown_grace)
    setup_metrics(app, Metrics(per_principal=s.metrics_per_principal))
    app.on_shutdown.extend(on_shutdown)
    setup_forwarded(app, trusted_proxies(s), s.forwarded_header, s.ipv6_prefix)
    setup_cors(app, s.cors_origins, ROOT_PATHS)
    # The store comes up before the model, so a bad Redis fails fast.
    setup_store(app, url=s.redis_url, data_dir=s.data_dir, binary=s.redis_server,
                timeout=s.redis_timeout)
    setup_auth(app, tokens=TokenVerifier(s), required=s.auth == "required",
               dev_mode=is_loopback(s.host), admin_key=s.admin_key,
               key_cache_ttl=s.key_cache_ttl, fail_limit=s.auth_fail_limit,
               fail_window=s.auth_fail_window)
    default = s.models[0]
    # A request in a worker may wait for room, a start and a slot, all in the first process.
    borrow = 2 * s.queue_timeout + float(max(m.startup_timeout or 0 for m in s.models))
    setup_quota(app, limits=limits_of(s), fail_open=s.limit_on_redis_down == "open",
                default_max_tokens=s.limit_default_max_tokens,
                cheap_slots=slots_for(default, s.admission_slots), queue_max=s.queue_max,
                queue_timeout=s.queue_timeout, slots_from=slots_from, borrow_timeout=borrow,
                stream_usage=s.upstream_stream_usage)
    timeouts = Timeouts(connect=s.connect_timeout, first_byte=s.first_byte_timeout,
                        idle=s.idle_timeout, request=s.request_timeout,
                        client_write=s.client_write_timeout)
    setup_relay(app, timeouts=timeouts, max_connections=s.upstream_connections)
    setup_backends(app, settings=s, lent=slots_from is not None)
    setup_routes(app, max_body=s.max_body_bytes, body_timeout=s.body_timeout,
                 sse_keepalive=s.sse_keepalive)
    setup_chat(app, limits=ChatLimits(max_message_chars=s.chat_max_message_chars,
                                      max_tokens=s.chat_max_tokens,
                                      context_tokens=s.chat_context_tokens,
                                      keepalive=s.sse_keepalive,
                                      write_timeout=s.client_write_timeout),
               ttl_s=s.chat_ttl_days * 86400, max_conversations=s.chat_max_conversations)
    setup_ledger(app, retention_days=s.usage_retention_days)
    setup_admin(app, issue=functools.partial(issue_token, s))
    setup_models(app)
    setup_openapi(app)
    setup_page(app)
    setup_scrape(app, token=s.metrics_token, first_process=slots_from is None,
                 relayed=s.tunnel != "none" or s.trust_loopback_proxy or bool(s.trusted_proxies))
    return app
