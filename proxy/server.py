"""Run the app: bind first (so a busy port fails before anything starts), serve, drain on signal."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from config import ConfigError, Settings
from config.paths import python_command
from config.settings import default_data_dir
from proxy.access.limits import describe_limits
from proxy.api.models import RELOAD
from proxy.app import create_app, limits_of, trusted_proxies
from proxy.edge.connection import EdgeLimits, EdgeRunner
from proxy.edge.drain import ABORT_WAIT
from proxy.edge.tls import CertificateError, Certificates
from proxy.errors import OpenAIError
from proxy.runtime.tunnel import (
    SKIP_WARNING_HEADER,
    Tunnel,
    check_tunnel,
    is_free_plan,
    open_tunnel,
)
from proxy.upstream.pool import CATALOG
from proxy.workers import WorkerPool

log = logging.getLogger("proxy")


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # --workers: the kernel spreads connections over the processes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("port", f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


@dataclass
class Running:
    app: web.Application
    runner: web.AppRunner
    base_url: str
    settings: Settings
    tls: Certificates | None = None

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


def certificates(settings: Settings) -> Certificates | None:
    """HTTPS when a certificate is set."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        return Certificates(settings.tls_cert, settings.tls_key)
    except CertificateError as exc:
        raise ConfigError("tls_cert", str(exc)) from None


def reload_tls(running: Running) -> None:
    """SIGHUP: new connections get the certificate now on disk (a renewed one, say); open
    connections and their streams keep theirs. A certificate that does not load is reported
    and the old one kept."""
    if running.tls is None:
        log.info("SIGHUP: no TLS certificate to reload")
        return
    try:
        running.tls.reload()
    except CertificateError as exc:
        log.error("SIGHUP: kept the old certificate; %s", exc)
        return
    log.info("SIGHUP: reloaded the TLS certificate %s", running.tls.cert)


def raise_open_files_limit() -> None:
    """Each stream holds two sockets (client and model); 1024 files would cap us near 500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def start(settings: Settings, reuse_port: bool = False, slots_from: Path | None = None,
                on_shutdown: Sequence[Callable[[web.Application], Awaitable[None]]] = ()
                ) -> Running:
    """Bind, build the app and start serving; the caller stops it with runner.cleanup()."""
    raise_open_files_limit()
    tls = certificates(settings)
    sock = bind(settings.host, settings.port, reuse_port)
    runner = None
    try:
        app = create_app(settings, slots_from, on_shutdown)
        # handler_cancellation: a client that leaves cancels its handler, so upstream work
        # stops. Requests are drained on_shutdown (proxy/edge/drain.py); what is left after that
        # gets aiohttp's own short wait.
        edge = EdgeLimits(header_timeout=settings.header_timeout,
                          max_connections=settings.max_connections,
                          max_connections_per_client=settings.max_connections_per_client,
                          send_buffer=settings.client_send_buffer,
                          write_timeout=settings.client_write_timeout,
                          proxies=trusted_proxies(settings),
                          max_body=settings.max_body_bytes,
                          answer_half_close=settings.client_half_close == "answer",
                          ipv6_prefix=settings.ipv6_prefix)
        runner = EdgeRunner(app, edge=edge, handler_cancellation=True, access_log=None,
                            shutdown_timeout=ABORT_WAIT,
                            keepalive_timeout=settings.keepalive_timeout)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=tls and tls.listening).start()
    except BaseException:
        sock.close()
        if runner is not None:
            await runner.cleanup()
        raise
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    return Running(app, runner, f"{scheme}://{host}:{port}", settings, tls)


# Allocations between young-generation collections (CPython's default is 700). A request
# allocates a few hundred objects that live until it ends, so at the default every few requests
# pay for a collection that frees little. Measured side by side at 32 concurrent requests:
# 519 µs of CPU a request against 554 with CPython's defaults.
GC_YOUNG = 20_000


def tune_gc() -> None:
    """Set aside what start-up built (modules, the app: it lives as long as the process), so
    full collections no longer walk it, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


async def serve(settings: Settings, *, worker: bool = False, slots_from: Path | None = None,
                reload_from: Callable[[], Settings] | None = None) -> None:
    """reload_from: the settings as the config file (and environment, and the same flags)
    now say, for SIGHUP and POST /admin/reload."""
    if worker:
        running = await start(settings, reuse_port=True, slots_from=slots_from)
        tune_gc()
        log.info("worker listening on %s", running.base_url)
        await _wait_for_signal(lambda: reload_tls(running))
        await running.runner.cleanup()
        return
    check_tunnel(settings)  # a missing token or package: one line, before anything starts
    pool = WorkerPool(settings) if settings.workers > 1 else None
    # Shutdown order: our own requests drain, then the workers', then the child and Redis stop.
    running = await start(settings, reuse_port=pool is not None,
                          on_shutdown=[pool.stopped] if pool else [])
    tune_gc()
    base = running.base_url
    log.info("listening on %s (OpenAI base URL %s/v1)", base, base)
    print(f"llama-proxy listening on {base}  (OpenAI base URL: {base}/v1)", flush=True)
    try:
        tunnel = await open_tunnel(settings, base)
    except BaseException:  # refused by ngrok, or interrupted: stop what start() started
        await running.runner.cleanup()
        raise
    if tunnel is not None:
        _announce_tunnel(settings, tunnel)
    limits = describe_limits(limits_of(settings), behind_proxy=bool(trusted_proxies(settings)))
    log.info("%s", limits)
    print(limits, flush=True)
    _warn_if_open(settings)
    catalog_reload = None
    if reload_from is not None:
        catalog_reload = functools.partial(reload_catalog, running, reload_from, pool)
        running.app[RELOAD] = catalog_reload
    if pool is not None:
        await pool.start(running.port, running.app[CATALOG], catalog_reload)

    announcer = asyncio.create_task(_announce_ready(running.app, base))
    reloads: set[asyncio.Task[Any]] = set()

    def reload() -> None:
        reload_tls(running)
        if pool is not None:
            pool.reload()
        if catalog_reload is not None:  # errors are logged there; nothing changes then
            task = asyncio.create_task(catalog_reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    await _wait_for_signal(reload)
    announcer.cancel()
    if tunnel is not None:  # no new public connections; those in flight drain with the rest
        await tunnel.close()
    log.info("shutting down: no new connections; in-flight requests get up to %.0fs",
             settings.shutdown_grace)
    if pool is not None:
        pool.terminate()  # the workers drain alongside us
    await running.runner.cleanup()
    log.info("stopped")


async def reload_catalog(running: Running, reload_from: Callable[[], Settings],
                         pool: WorkerPool | None) -> dict[str, Any]:
    """Re-read the configuration and apply the model catalog's difference
    (proxy/upstream/catalog.py, reload). A configuration that does not load changes nothing
    and says why; other settings that changed are named: they need a restart."""
    try:
        fresh = reload_from()
    except ConfigError as exc:
        log.error("reload: the configuration does not load; nothing changed: %s", exc)
        raise OpenAIError(400, f"The configuration does not load; nothing changed: {exc}",
                          code="invalid_config") from None
    done: dict[str, Any] = dict(await running.app[CATALOG].reload(fresh.models))
    now, then = fresh.masked(), running.settings.masked()
    done["needs_restart"] = [k for k in now if k != "models" and now[k] != then.get(k)]
    if done["needs_restart"]:
        log.warning("reload: only the model catalog is reloaded; %s change at a restart",
                    ", ".join(done["needs_restart"]))
    if pool is not None:
        pool.refresh(running.app[CATALOG])
    return done


async def _wait_for_signal(on_hangup: Callable[[], None]) -> None:
    """Until SIGTERM or SIGINT; SIGHUP calls on_hangup (and does not stop us)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()


def _announce_tunnel(settings: Settings, tunnel: Tunnel) -> None:
    """The public URL, and how to hand a credential for it to a phone or another machine."""
    url = tunnel.public_url
    print(f"llama-proxy public URL: {url}  (OpenAI base URL: {url}/v1)", flush=True)
    tool = f"{python_command()} generate_token.py" + _data_dir_flag(settings)
    print(f"for a phone or another machine: {tool} NAME --api-key --snippets --qr "
          f"--base-url {url}", flush=True)
    if is_free_plan(url):
        print(f"ngrok's free plan shows browsers a warning page first (Visit Site goes on); "
              f"API clients never see it, browser apps skip it with {SKIP_WARNING_HEADER}: 1",
              flush=True)


def _warn_if_open(settings: Settings) -> None:
    if settings.auth != "disabled":
        tool = f"{python_command()} generate_token.py" + _data_dir_flag(settings)
        print(f"credentials: {tool} NAME 24   (a JWT)   or   {tool} NAME --api-key", flush=True)
        return
    # The settings refuse auth = "disabled" on any other address than loopback.
    message = ("AUTH IS DISABLED: anyone who can reach this loopback port uses the model; "
               "X-User-Id is accepted as the user (development mode)")
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


async def _announce_ready(app: web.Application, base: str) -> None:
    model = app[CATALOG].models[0]
    if model.supervisor is None or not model.entry.preload:
        return
    await model.supervisor.ready.wait()
    print(ready_hint(model.supervisor.settings, model.id, base), file=sys.stdout, flush=True)


def _data_dir_flag(settings: Settings) -> str:
    """generate_token.py must use the appliance's data dir (its JWT secret and Redis)."""
    return "" if settings.data_dir == default_data_dir() else f" --data-dir {settings.data_dir}"


def ready_hint(settings: Settings, model: str, base: str) -> str:
    """Commands a user can paste as printed to get a first answer."""
    auth, first = "", ""
    if settings.auth == "required":
        first = (f"  TOKEN=$({python_command()} generate_token.py you 24{_data_dir_flag(settings)}"
                 " | tail -1)\n")
        auth = '-H "Authorization: Bearer $TOKEN" '
    return (f"model {model} is ready: try\n{first}"
            f"  curl {base}/v1/chat/completions {auth}-H 'Content-Type: application/json' "
            "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'")
