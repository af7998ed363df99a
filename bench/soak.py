"""A bounded soak (`make soak`): minutes of steady, mixed, partly hostile traffic against one
appliance on loopback; its memory and open descriptors must stay flat from the first minute to
the last, and nothing may fail that should not.

The mix, at a fixed concurrency: whole answers, streams read to the end, streams the client
leaves in the middle, readers that stop reading (cut by the write deadline), bad credentials,
requests over a small key's rate limit (429), and half-sent headers (cut by the header
deadline). Writes bench/results/soak.{json,md}.

    python -m bench.soak [--minutes 3] [--concurrency 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.stack import appliance, credential, stack
from tests.kit.helpers import REPO

RESULTS = REPO / "bench" / "results"
CHAT = "/v1/chat/completions"
SAMPLE_EVERY = 5.0
# What each kind of client may get back; anything else is an unexpected error.
EXPECTED = {"whole": {200}, "stream": {200}, "leave": {200}, "stall": {200},
            "bad_key": {401}, "over_limit": {200, 429}, "half_headers": {408}}
WEIGHTS = {"whole": 25, "stream": 25, "leave": 12, "stall": 4, "bad_key": 12,
           "over_limit": 17, "half_headers": 5}


def _established(sock: socket.socket) -> bool:
    """TCP's own state (the first byte of struct tcp_info): 1 is ESTABLISHED."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, base: str, token: str, limited_key: str) -> None:
        self.base = base
        self.port = int(base.rsplit(":", 1)[1])
        self.token = token
        self.limited_key = limited_key
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.unexpected: list[str] = []

    def note(self, kind: str, outcome: int | str) -> None:
        self.outcomes[(kind, str(outcome))] += 1
        if outcome not in EXPECTED[kind] and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {outcome}")

    async def post(self, http: aiohttp.ClientSession, kind: str, body: dict, credential: str,
                   read: Callable[[aiohttp.ClientResponse], Awaitable[None]]) -> None:
        headers = {"Authorization": f"Bearer {credential}"}
        async with http.post(self.base + CHAT, json=body, headers=headers) as resp:
            await read(resp)
            self.note(kind, resp.status)

    async def one(self, http: aiohttp.ClientSession, kind: str) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        stream = {**body, "stream": True, "fake": {"chunks": 40, "gap": 0.01}}

        async def whole(resp: aiohttp.ClientResponse) -> None:
            await resp.read()

        async def leave(resp: aiohttp.ClientResponse) -> None:
            for _ in range(3):
                await resp.content.readline()
            resp.close()  # the client goes away in the middle

        try:
            if kind == "whole":
                await self.post(http, kind, body, self.token, whole)
            elif kind == "stream":
                await self.post(http, kind, stream, self.token, whole)
            elif kind == "leave":
                await self.post(http, kind, stream, self.token, leave)
            elif kind == "bad_key":
                await self.post(http, kind, body, "sk-00000000_" + "x" * 40, whole)
            elif kind == "over_limit":
                await self.post(http, kind, body, self.limited_key, whole)
            elif kind == "stall":
                await self.stall()
            else:
                await self.half_headers()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.note(kind, type(exc).__name__)

    async def stall(self) -> None:
        """A reader that stops reading a long, fast stream; the appliance must cut it."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            body = json.dumps({"model": "fake-model", "messages": [], "stream": True,
                               "fake": {"chunks": 200_000, "gap": 0}}).encode()
            await loop.sock_sendall(sock, (
                f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body)
            head = await loop.sock_recv(sock, 64)
            status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1") else 0
            # Then wait, not reading, for the cut: the unread bytes stay readable, so ask TCP.
            async with asyncio.timeout(60):
                while _established(sock):  # noqa: ASYNC110 - polling the kernel's state
                    await asyncio.sleep(0.5)
            self.note("stall", status)
        finally:
            sock.close()

    async def half_headers(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            async with asyncio.timeout(30):
                answer = await reader.read()
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
            self.note("half_headers", status)
        finally:
            writer.close()

    async def run(self, seconds: float, concurrency: int) -> None:
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        deadline = time.monotonic() + seconds
        rng = random.Random(20261123)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self.one(http, rng.choices(kinds, weights)[0])

            await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample(pid: int, seconds: float, into: list[tuple[float, float, int]]) -> None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        into.append((time.monotonic() - started, rss_mb(pid), open_fds(pid)))
        await asyncio.sleep(SAMPLE_EVERY)


def window(samples: list[tuple[float, float, int]], start: float, end: float
           ) -> tuple[float, float]:
    picked = [(m, f) for t, m, f in samples if start <= t < end] or [samples[-1][1:]]
    return statistics.fmean(m for m, _ in picked), statistics.fmean(f for _, f in picked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=24)
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    with stack() as run:
        procs, redis_url, fake, data = run.procs, run.redis_url, run.fake, run.data
        # All traffic comes from one address, so the failed-login block is lifted; the
        # deadlines are short so the hostile clients are cut within the run.
        base, pid = appliance(procs, "appliance", fake, redis_url, data,
                              "--auth-fail-limit", "1000000000", "--header-timeout", "2",
                              "--client-write-timeout", "3", "--limit-rpm", "100000")
        token = credential(data, redis_url, "soak", "2")
        limited = credential(data, redis_url, "small", "--api-key", "--rpm", "30")
        soak = Soak(base, token, limited)
        samples: list[tuple[float, float, int]] = []
        print(f"soak: {args.minutes:g} min at concurrency {args.concurrency} against "
              f"{base}", file=sys.stderr, flush=True)

        async def both() -> None:
            await asyncio.gather(soak.run(seconds, args.concurrency),
                                 sample(pid, seconds, samples))

        asyncio.run(both())
        time.sleep(3)  # the last cut connections close
        samples.append((seconds + 3, rss_mb(pid), open_fds(pid)))
    return report(soak, samples, args, seconds)


def report(soak: Soak, samples: list[tuple[float, float, int]], args: argparse.Namespace,
           seconds: float) -> int:
    first_mb, first_fds = window(samples, 0, 60)
    last_mb, last_fds = window(samples, seconds - 60, seconds)
    idle_mb, idle_fds = samples[-1][1], samples[-1][2]
    total = sum(soak.outcomes.values())
    result = {
        "minutes": args.minutes, "concurrency": args.concurrency, "requests": total,
        "outcomes": {f"{k}:{o}": n for (k, o), n in sorted(soak.outcomes.items())},
        "unexpected": soak.unexpected,
        "rss_mb": {"first_minute": round(first_mb, 1), "last_minute": round(last_mb, 1),
                   "after": round(idle_mb, 1)},
        "open_fds": {"first_minute": round(first_fds, 1), "last_minute": round(last_fds, 1),
                     "after": idle_fds},
        "samples": [{"t": round(t, 1), "rss_mb": round(m, 1), "fds": f} for t, m, f in samples],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))
    lines = [f"Soak: {args.minutes:g} min, concurrency {args.concurrency}, {total} requests.",
             "", "| | first minute | last minute | after |", "|---|---|---|---|",
             f"| RSS MB | {first_mb:.1f} | {last_mb:.1f} | {idle_mb:.1f} |",
             f"| open descriptors | {first_fds:.1f} | {last_fds:.1f} | {idle_fds} |", "",
             "| client | outcome | count |", "|---|---|---|",
             *(f"| {k} | {o} | {n} |" for (k, o), n in sorted(soak.outcomes.items())), "",
             f"Unexpected: {len(soak.unexpected)} {soak.unexpected[:5]}"]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    flat = last_mb - first_mb < 10 and last_fds - first_fds < 20
    ok = not soak.unexpected and flat
    print(f"\n{'met' if ok else 'NOT MET'}: memory and descriptors flat, no unexpected errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
