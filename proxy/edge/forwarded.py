"""Who the client is: decided once, at the edge, before anything uses the address.

Behind a tunnel or reverse proxy every connection comes from the proxy, so the client is taken
from the proxy's forwarding headers, but only when the direct peer is a proxy the operator
trusts: anyone else could write those headers. In `X-Forwarded-For` each proxy appends the
address it saw, so the client is the rightmost address that is not itself a trusted proxy (the
ones to its left were written by the client and prove nothing). `Forwarded` (RFC 7239) is read
the same way when there is no `X-Forwarded-For`; the scheme comes from `X-Forwarded-Proto`.
The decision is kept on the request (`client_address`, `client_scheme`), and the access log,
per-address limits and the failed-login block all read it from there. (aiohttp's
`request.clone(remote=...)` would hand later middlewares a copy whose state the response hooks
never see.)
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.errors import OpenAIError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
CLIENT_ADDRESS = web.RequestKey("client", str)  # set only when a trusted proxy named the client
IPV6_PREFIX = web.AppKey("ipv6_prefix", int)  # IPv6 clients are counted by this network
SCHEME = web.RequestKey("scheme", str)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: IPv4 clients behind a NAT64 gateway
MAX_HOPS = 32  # a longer chain is junk or an attack; only its rightmost hops are read
UNKNOWN = "unknown"  # the client a proxy would not name: all such share one window


class TrustedProxies:
    """The networks whose forwarding headers are believed."""

    def __init__(self, cidrs: Iterable[str], loopback: bool = False) -> None:
        networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self.networks: tuple[Network, ...] = tuple(networks) + (LOOPBACK if loopback else ())

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: Address | str | None) -> bool:
        ip = parse_address(address) if not isinstance(address, Address) else address
        if ip is None:
            return False
        return any(ip in net for net in self.networks)


def parse_address(value: object) -> Address | None:
    """An IP address from a header or socket (brackets, ports and IPv4-in-IPv6 undone)."""
    if not isinstance(value, str):
        return None
    text = value.strip().strip('"')
    if text.startswith("["):  # "[2001:db8::1]:4711"
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if getattr(ip, "scope_id", None):  # "fe80::1%eth0": a zone is no client's, and text
        return None                    # after % would reach the log as it was written
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


class BadForwarding(OpenAIError):
    def __init__(self) -> None:
        super().__init__(400, "A forwarding header from the proxy in front is not valid",
                         code="invalid_forwarded_header")


def client_of(peer: str | None, hops: Sequence[str], trusted: TrustedProxies
              ) -> tuple[str | None, int | None]:
    """The client's address and its position in `hops` (None: the direct peer). `hops` are the
    forwarded addresses, left (first proxy's client) to right (the last proxy's)."""
    if peer not in trusted:
        return peer, None
    position = None
    client = peer
    for index in range(len(hops) - 1, max(len(hops) - MAX_HOPS, 0) - 1, -1):
        hop = hops[index].strip().strip('"')
        if hop.lower() == "unknown" or hop.startswith("_"):  # RFC 7239: a client not named
            return UNKNOWN, index
        ip = parse_address(hop)
        if ip is None:  # a trusted proxy would not write this: refuse rather than guess
            raise BadForwarding
        client, position = str(ip), index
        if ip not in trusted:
            break
    return client, position


def _hops(request: web.Request, header: str) -> list[str]:
    """Only the header the proxy writes: with the other one, a client's own copy would pass
    through the proxy untouched and be believed."""
    if header == "forwarded":
        return [str(element.get("for", "")) for element in request.forwarded]
    return [hop for line in request.headers.getall(hdrs.X_FORWARDED_FOR, [])
            for hop in line.split(",")]


def _scheme(request: web.Request, header: str, position: int | None, hop_count: int
            ) -> str | None:
    if header == "forwarded":
        protos = [str(e.get("proto", "")).lower() for e in request.forwarded]
    else:
        protos = [p.strip().lower() for line in request.headers.getall(hdrs.X_FORWARDED_PROTO,
                                                                       []) for p in line.split(",")]
    if not protos:
        return None
    # Aligned with the addresses, the client's own hop says what it used; else the nearest.
    chosen = protos[position] if len(protos) == hop_count and position is not None else protos[-1]
    return chosen if chosen in ("http", "https") else None


def client_address(request: web.BaseRequest) -> str:
    """The client as decided at the edge: the one a trusted proxy named, else the peer."""
    return request.get(CLIENT_ADDRESS) or request.remote or "unknown"


def client_group(request: web.BaseRequest) -> str:
    """Whom per-address limits and the failed-login block count the client as."""
    return address_group(client_address(request), request.app.get(IPV6_PREFIX, 64))


@functools.lru_cache(maxsize=4096)
def address_group(address: str, ipv6_prefix: int) -> str:
    """An IPv4 address itself; an IPv6 one as its /ipv6_prefix network, since one subscriber
    gets a whole /64 and could rotate through it to escape a per-address limit."""
    ip = parse_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip in NAT64:  # an IPv4 client, translated
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if not isinstance(ip, ipaddress.IPv6Address) or ipv6_prefix >= 128:
        return address if ip is None else str(ip)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


def client_scheme(request: web.BaseRequest) -> str:
    return request.get(SCHEME) or request.scheme


def setup_forwarded(app: web.Application, trusted: TrustedProxies,
                    header: str = "x-forwarded-for", ipv6_prefix: int = 64) -> None:
    """Call right after setup_front: its refusals are shaped and logged like any other, and the
    access line (written when the request ends) names the client decided here."""
    app[IPV6_PREFIX] = ipv6_prefix
    if not trusted:
        return  # nothing believed: the client is the peer, as aiohttp sees it

    @web.middleware
    async def real_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        hops = _hops(request, header)
        if hops:
            client, position = client_of(request.remote, hops, trusted)
            if position is not None:  # an untrusted peer's headers are ignored
                request[CLIENT_ADDRESS] = client
                if scheme := _scheme(request, header, position, len(hops)):
                    request[SCHEME] = scheme
        return await handler(request)

    app.middlewares.append(real_client)
