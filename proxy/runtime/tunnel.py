"""The public tunnel: ngrok's agent run inside this process (`tunnel = "ngrok"`).

The `ngrok` package (an optional extra) carries the agent as a library, so there is no second
program to install or supervise. Inside a running event loop its calls return awaitables. The
agent connects to our own listener over loopback and names the real client in
`X-Forwarded-For` and the scheme (https) in `X-Forwarded-Proto`; the loader turns
`trust_loopback_proxy` on with a tunnel, so the edge believes those headers
(proxy/edge/forwarded.py).

A tunnel that was asked for and cannot open stops the appliance with one line (exit status 2,
like any setting that cannot be used): a user who asked for a public URL and did not get one
would otherwise wait for requests that never come. Missing token and missing package are found
before anything starts (check_tunnel); what ngrok itself refuses is found once our listener is up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import urlsplit

from config import ConfigError, Settings
from config.paths import python_command
from proxy.observe.logs import redact, register_secret

log = logging.getLogger("proxy.tunnel")
OPEN_TIMEOUT = 30.0  # seconds ngrok may take to open the tunnel before we give up
CLOSE_TIMEOUT = 5.0  # seconds closing may take on shutdown: an unreachable ngrok must not hang it
TOKEN_URL = "https://dashboard.ngrok.com/get-started/your-authtoken"
# Hosts of ngrok's free plan: its edge shows browsers a warning page first.
FREE_PLAN_DOMAINS = (".ngrok-free.app", ".ngrok-free.dev", ".ngrok-free.pizza")
NGROK_DOMAINS = (*FREE_PLAN_DOMAINS, ".ngrok.app", ".ngrok.dev", ".ngrok.io", ".ngrok.pizza")
SKIP_WARNING_HEADER = "ngrok-skip-browser-warning"
CODE = re.compile(r"ERR_NGROK_\d+")


@dataclass
class Tunnel:
    public_url: str
    _close: Callable[[], Awaitable[object]]

    async def close(self) -> None:
        """Stop taking new connections at ngrok's edge (on shutdown, before draining)."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._close()
        except Exception as exc:  # shutting down either way; say so and go on
            log.warning("the ngrok tunnel did not close cleanly: %s", _one_line(exc, None))
        else:
            log.info("closed the ngrok tunnel %s", self.public_url)


def check_tunnel(settings: Settings) -> ModuleType | None:
    """Before anything starts: the token first (it needs no package), then the package."""
    if settings.tunnel == "none":
        return None
    token = settings.ngrok_authtoken
    if not token:
        raise ConfigError("tunnel", f"ngrok needs NGROK_AUTHTOKEN (free at {TOKEN_URL}; or set "
                          "LLAMA_PROXY_NGROK_AUTHTOKEN, or ngrok_authtoken in the config file)")
    register_secret(token)  # the ngrok library logs through ours: it never prints the token
    try:
        import ngrok  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError("tunnel", "ngrok needs the ngrok package: "
                          f"{python_command()} -m pip install ngrok") from None
    return ngrok


async def open_tunnel(settings: Settings, local_url: str) -> Tunnel | None:
    """Open the tunnel to our listener at local_url; None when no tunnel is asked for."""
    ngrok = check_tunnel(settings)
    if ngrok is None:
        return None
    token = settings.ngrok_authtoken
    address, options = forward_target(local_url)
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            listener = await ngrok.forward(address, authtoken=token, **options)
        public_url = str(listener.url()).rstrip("/")
    except TimeoutError:
        raise ConfigError("tunnel", f"ngrok did not open a tunnel within {OPEN_TIMEOUT:.0f} s "
                          "(can this machine reach the internet?)") from None
    except Exception as exc:  # the library raises plain exceptions with ngrok's own message
        raise ConfigError("tunnel", f"ngrok refused the tunnel: {_one_line(exc, token)}"
                          ) from None
    log.info("ngrok tunnel %s -> %s", public_url, address)
    return Tunnel(public_url, listener.close)


def forward_target(local_url: str) -> tuple[str, dict[str, object]]:
    """What the agent connects to: our own listener, over loopback when we listen on all
    addresses; our TLS is not checked (the certificate names the public host, not 127.0.0.1)."""
    parts = urlsplit(local_url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    if ip is not None and not ip.is_loopback:
        log.warning("the tunnel connects to %s, which is not loopback: its X-Forwarded-For is "
                    "believed only with trusted_proxies = [\"%s\"]", host, host)
    shown = host if ip is None else (f"[{ip}]" if ip.version == 6 else str(ip))
    if parts.scheme == "https":
        return f"https://{shown}:{port}", {"verify_upstream_tls": False}
    return f"tcp://{shown}:{port}", {}  # the library's own form of a plain address


def is_free_plan(url: str) -> bool:
    return (urlsplit(url).hostname or "").lower().endswith(FREE_PLAN_DOMAINS)


def _one_line(exc: BaseException, token: str | None) -> str:
    """ngrok's message as one line, without the token (ERR_NGROK_105 quotes it back). The
    library raises ValueError(what, ngrok's message[, "ERR_NGROK_nnn"])."""
    parts = [a.strip() for a in exc.args if isinstance(a, str) and a.strip()]
    parts = parts or [str(exc).strip() or type(exc).__name__]
    codes = [p for p in parts if CODE.fullmatch(p)]
    text = ": ".join(p for p in parts if p not in codes)
    if token:
        text = text.replace(token, "***")
    text = redact(text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first or type(exc).__name__
    code = codes[0] if codes else (m.group(0) if (m := CODE.search(text)) else None)
    if code and code not in first:
        first = f"{first} ({code})"
    return first[:300]
