"""A small load generator (aiohttp client): closed loop at a set concurrency, open loop at a rate.

Reports requests/s, latency percentiles, time to first byte of a stream, chunks/s and errors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.llm_benchmark import percentile


@dataclass
class Stats:
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    chunks: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what[:200])

    def summary(self) -> dict[str, float]:
        ok = len(self.latencies)
        return {
            "requests": ok, "errors": self.errors,
            "req_per_s": ok / self.wall if self.wall else 0.0,
            "p50_ms": percentile(self.latencies, 0.5) * 1000,
            "p90_ms": percentile(self.latencies, 0.9) * 1000,
            "p99_ms": percentile(self.latencies, 0.99) * 1000,
            "ttft_p50_ms": percentile(self.ttfts, 0.5) * 1000 if self.ttfts else float("nan"),
            "chunks_per_s": self.chunks / self.wall if self.wall else 0.0,
        }


@dataclass
class Target:
    url: str  # full endpoint URL
    headers: dict[str, str] = field(default_factory=dict)
    fresh_connections: bool = False  # llama-server drops keep-alive after a stream


async def one(http: aiohttp.ClientSession, target: Target, body: bytes, stream: bool,
              stats: Stats) -> None:
    started = time.perf_counter()
    try:
        async with http.post(target.url, data=body, headers=target.headers) as resp:
            if resp.status != 200:
                stats.error(f"HTTP {resp.status}: {(await resp.text())[:120]}")
                return
            if stream:
                first = True
                async for chunk in resp.content.iter_any():
                    if first:
                        stats.ttfts.append(time.perf_counter() - started)
                        first = False
                    stats.chunks += chunk.count(b"data: ")
                    if b'"error"' in chunk:
                        stats.error("error event in stream")
                        return
            else:
                await resp.read()
                stats.chunks += 1
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        stats.error(repr(exc))
        return
    stats.latencies.append(time.perf_counter() - started)


def session(target: Target, limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, force_close=target.fresh_connections)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    headers = {"Content-Type": "application/json"}
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)


async def closed_loop(target: Target, payload: dict[str, Any], concurrency: int,
                      duration: float) -> Stats:
    """`concurrency` clients, each sending its next request when the last one ends."""
    body, stream = orjson.dumps(payload), payload.get("stream") is True
    stats = Stats()
    async with session(target) as http:
        await one(http, target, body, stream, Stats())  # warm the connection up
        deadline = time.perf_counter() + duration

        async def client() -> None:
            while time.perf_counter() < deadline:
                await one(http, target, body, stream, stats)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        stats.wall = time.perf_counter() - started
    return stats


async def open_loop(target: Target, payload: dict[str, Any], rate: float, duration: float
                    ) -> Stats:
    """Requests start on a fixed schedule whatever the latency, as real traffic does."""
    body, stream = orjson.dumps(payload), payload.get("stream") is True
    stats = Stats()
    async with session(target) as http:
        await one(http, target, body, stream, Stats())
        started = time.perf_counter()
        tasks = []
        for i in range(int(rate * duration)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, target, body, stream, stats)))
        await asyncio.gather(*tasks)
        stats.wall = time.perf_counter() - started
    return stats


async def hold_streams(target: Target, payload: dict[str, Any], count: int) -> Stats:
    """`count` streams open at the same moment (for memory and connection limits)."""
    body = orjson.dumps(payload)
    stats = Stats()
    async with session(target) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http, target, body, True, stats) for _ in range(count)))
        stats.wall = time.perf_counter() - started
    return stats
