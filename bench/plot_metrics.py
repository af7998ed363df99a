"""docs/metrics.png: what /metrics shows while the appliance serves the real model. Starts Redis
and the appliance supervising its own llama-server (the bundled model), sends a short burst of
real traffic with some refusals in it, scrapes /metrics every second, and draws what a dashboard
would: requests by status, time to first token, tokens/s, the slot queue, and refusals.

    python -m bench.plot_metrics [--seconds 60] [--out docs/metrics.png]
    python -m bench.plot_metrics --base-url http://127.0.0.1:8000 --token JWT [--api-key KEY]

With --base-url it uses an appliance already running on this host (its /metrics is open to
loopback); --token is a credential for the traffic, --api-key an optional second one that is
sent more requests than its rate limit allows. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import Processes, credential, start_redis
from tests.kit.helpers import REPO, free_port, http_status, wait_until

CHAT = "/v1/chat/completions"
PROMPTS = ["Write a haiku about the sea.", "Name three colours.", "What is a lighthouse?",
           "Say hello in French.", "Count from one to five."]
WINDOW = 10  # seconds over which rates and quantiles are computed (like rate(...[10s]))
# Users come in waves: (share of the burst's time, users arriving (+) or leaving (-)).
WAVES = [(0.0, 1), (0.2, 2), (0.45, 3), (0.75, -4)]


# -- the appliance --------------------------------------------------------------------------------

def start_appliance(procs: Processes, redis_url: str, data: Path) -> str:
    """`python -m proxy` supervising the bundled llama-server: its base URL once ready.

    Limits: 600 requests a minute per principal (the API key below has 3 of its own), 2 model
    slots and a queue of 8 (small, so that a burst shows waiting)."""
    port = free_port()
    procs.start("appliance", [
        sys.executable, "-m", "proxy", "--port", str(port), "--redis-url", redis_url,
        "--data-dir", str(data), "--log-level", "warning", "--limit-rpm", "600",
        "--limit-tpm", "0", "--limit-concurrency", "0", "--limit-ip-rpm", "0",
        # Every client here is 127.0.0.1: the scanner's failures must not block the users.
        "--auth-fail-limit", "100000", "--parallel", "2", "--queue-max", "8"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(base + "/ready") == 200, 120, "the appliance")
    except AssertionError:
        log = (procs.work / "appliance.log").read_text(errors="replace")
        raise SystemExit(f"the appliance did not become ready; its log ends:\n{log[-2000:]}"
                         ) from None
    return base


# -- traffic --------------------------------------------------------------------------------------

@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, status: int) -> None:
        self.statuses[status] += 1


async def chat(http: aiohttp.ClientSession, base: str, key: str | None, prompt: str,
               max_tokens: int, stream: bool, tally: Tally) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, "temperature": 0.7}
    try:
        async with http.post(base + CHAT, json=body, headers=headers) as resp:
            async for _ in resp.content.iter_chunked(4096):
                pass
            status = resp.status
    except aiohttp.ClientError:
        status = 0
    tally.add(status)
    return status


async def user(http: aiohttp.ClientSession, base: str, key: str, until: float, n: int,
               tally: Tally) -> None:
    """A user streaming answers one after the other."""
    i = n
    while time.monotonic() < until:
        if await chat(http, base, key, PROMPTS[i % len(PROMPTS)], 48, True, tally) != 200:
            await asyncio.sleep(1)  # refused: no tight loop
        i += 1


async def greedy(http: aiohttp.ClientSession, base: str, key: str, until: float,
                 tally: Tally) -> None:
    """A client sending short requests faster than its rate limit allows (429 rpm)."""
    while time.monotonic() < until:
        await chat(http, base, key, "Hi.", 1, False, tally)
        await asyncio.sleep(1.0)


async def scanner(http: aiohttp.ClientSession, base: str, until: float, tally: Tally) -> None:
    """Requests without a credential and with a forged one (401)."""
    i = 0
    while time.monotonic() < until:
        await chat(http, base, None if i % 2 else "not-a-token", "Hi.", 1, False, tally)
        i += 1
        await asyncio.sleep(1.0)


async def traffic(base: str, token: str, api_key: str | None, seconds: float,
                  tally: Tally) -> None:
    """Users come in waves: 1, then 3, then 6 at once (more than the 2 model slots), then 2;
    all the while a scanner is refused (401) and, with api_key, a greedy client too (429)."""
    start = time.monotonic()
    until = start + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        others = [asyncio.create_task(scanner(http, base, until, tally))]
        if api_key:
            others.append(asyncio.create_task(greedy(http, base, api_key, until, tally)))
        users: list[asyncio.Task[None]] = []
        for at, change in WAVES:
            await asyncio.sleep(max(0.0, start + at * seconds - time.monotonic()))
            if change > 0:
                users += [asyncio.create_task(user(http, base, token, until, len(users) + i,
                                                   tally)) for i in range(change)]
            else:  # the last to come leave first, in the middle of their answers
                for task in users[change:]:
                    task.cancel()
                others += users[change:]
                users = users[:change]
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        # Answers under way may finish; after 10 s more they are cut (the run stays bounded).
        _, late = await asyncio.wait([*others, *users], timeout=10)
        for task in late:
            task.cancel()
        await asyncio.gather(*others, *users, return_exceptions=True)


# -- scrapes --------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scraper(base: str, headers: dict[str, str], start: float, until: float,
                  out: list[tuple[float, Samples]]) -> None:
    """/metrics every second: (seconds since start, every sample by name and labels)."""
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            t = time.monotonic()
            async with http.get(base + "/metrics", headers=headers) as resp:
                text = await resp.text()
            samples: Samples = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    samples[s.name, tuple(sorted(s.labels.items()))] = s.value
            out.append((t - start, samples))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name
               and all(dict(ls).get(k) == want for k, want in labels.items()))


def label_values(scrapes: list[tuple[float, Samples]], name: str, label: str) -> list[str]:
    return sorted({dict(ls)[label] for _, s in scrapes for (n, ls) in s
                   if n == name and label in dict(ls)})


def rates(scrapes: list[tuple[float, Samples]], name: str, **labels: str
          ) -> tuple[list[float], list[float]]:
    """Per-second increase over the last WINDOW seconds, at each scrape."""
    xs, ys = [], []
    for i in range(WINDOW, len(scrapes)):
        (t0, a), (t1, b) = scrapes[i - WINDOW], scrapes[i]
        xs.append(t1)
        ys.append(max(total(b, name, **labels) - total(a, name, **labels), 0.0) / (t1 - t0))
    return xs, ys


def plot_rates_by(ax: Any, scrapes: list[tuple[float, Samples]], name: str, label: str) -> None:
    """One line per value of `label`: the rate of counter `name` with that value."""
    for value in label_values(scrapes, name, label):
        xs, ys = rates(scrapes, name, **{label: value})
        ax.plot(xs, ys, label=value)


def gauge(scrapes: list[tuple[float, Samples]], name: str) -> tuple[list[float], list[float]]:
    return [t for t, _ in scrapes], [total(s, name) for _, s in scrapes]


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9)
        lower, below = bound, buckets[bound]
    return math.nan


def quantiles(scrapes: list[tuple[float, Samples]], name: str, q: float
              ) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i in range(WINDOW, len(scrapes)):
        (_, a), (t1, b) = scrapes[i - WINDOW], scrapes[i]
        buckets: dict[float, float] = defaultdict(float)
        for (n, ls), value in b.items():
            if n == name + "_bucket":
                le = float(dict(ls)["le"])
                buckets[le] += value - a.get((n, ls), 0.0)
        xs.append(t1)
        ys.append(quantile(q, buckets))
    return xs, ys


# -- the picture ----------------------------------------------------------------------------------

def draw(scrapes: list[tuple[float, Samples]], burst: tuple[float, float], out: Path,
         title: str) -> None:
    """burst: when the traffic started and how long it lasted (seconds since the first
    scrape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    requests = "llama_proxy_requests_total"

    ax = axes[0][0]
    for status in ("2xx", "4xx", "5xx"):
        xs, ys = rates(scrapes, requests, route=CHAT, status=status)
        if any(ys):
            ax.plot(xs, ys, label=status)
    ax.set_title("Chat requests/s by status")
    ax.set_ylabel("requests/s")

    ax = axes[0][1]
    for q, style in ((0.5, "--"), (0.95, "-")):
        xs, ys = quantiles(scrapes, "llama_proxy_time_to_first_token_seconds", q)
        ax.plot(xs, ys, style, label=f"p{int(q * 100)}")
    ax.set_title("Time to first token")
    ax.set_ylabel("seconds")

    ax = axes[0][2]
    for kind in ("prompt", "completion"):
        xs, ys = rates(scrapes, "llama_proxy_tokens_total", type=kind)
        ax.plot(xs, ys, label=kind)
    ax.set_title("Tokens/s")
    ax.set_ylabel("tokens/s")

    ax = axes[1][0]
    for name, label in (("llama_proxy_queue_waiting", "waiting"),
                        ("llama_proxy_slots_busy", "busy slots"),
                        ("llama_proxy_open_streams", "open streams")):
        xs, ys = gauge(scrapes, name)
        ax.step(xs, ys, where="post", label=label)
    xs, ys = gauge(scrapes, "llama_proxy_slots")
    ax.plot(xs, ys, ":", color="grey", label="slots")
    ax.set_title("Slot queue")
    ax.set_ylabel("requests")

    ax = axes[1][1]
    plot_rates_by(ax, scrapes, "llama_proxy_rate_limited_total", "window")
    ax.set_title("429s/s by window")
    ax.set_ylabel("refusals/s")

    ax = axes[1][2]
    plot_rates_by(ax, scrapes, "llama_proxy_auth_failures_total", "reason")
    ax.set_title("Auth failures/s by reason")
    ax.set_ylabel("refusals/s")

    began, seconds = burst
    users = 0
    for at, change in WAVES:
        users += change
        for row in axes:
            for ax in row:
                ax.axvline(began + at * seconds, color="grey", lw=0.6, alpha=0.5)
        axes[1][0].annotate(f"{users} user{'s' * (users != 1)}",
                            (began + at * seconds, 0), xycoords=("data", "axes fraction"),
                            xytext=(2, 2), textcoords="offset points", va="bottom",
                            fontsize="x-small", color="grey")
    for row in axes:
        for ax in row:
            ax.axvline(began + seconds, color="grey", lw=0.6, alpha=0.5)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize="small")
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def loopback_only(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"{url}: this script sends its burst to this host only (127.0.0.1)")
    return url.rstrip("/")


async def measure(base: str, token: str, api_key: str | None, seconds: float,
                  ) -> tuple[list[tuple[float, Samples]], float, Tally]:
    """Scrapes from a few quiet seconds before the burst to a few after it, when it began,
    and what the clients got."""
    scrapes: list[tuple[float, Samples]] = []
    tally = Tally()
    start = time.monotonic()
    scraping = asyncio.create_task(scraper(base, {}, start, start + seconds + 15, scrapes))
    await asyncio.sleep(4)
    began = time.monotonic() - start
    await traffic(base, token, api_key, seconds, tally)
    await scraping
    return scrapes, began, tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the burst")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "metrics.png")
    parser.add_argument("--base-url", help="an appliance already running on this host")
    parser.add_argument("--token", help="with --base-url: a credential for the traffic")
    parser.add_argument("--api-key", help="with --base-url: a credential to push past its limit")
    args = parser.parse_args()
    if not 5 <= args.seconds <= 90:
        parser.error("--seconds: 5 to 90 (the whole run stays under two minutes)")

    procs = None
    try:
        if args.base_url:
            if not args.token:
                parser.error("--base-url needs --token")
            base, token, api_key = loopback_only(args.base_url), args.token, args.api_key
        else:
            procs = Processes(Path(tempfile.mkdtemp(prefix="plot-metrics-")))
            _, redis_url = start_redis(procs)
            data = procs.work / "data"
            base = start_appliance(procs, redis_url, data)
            token = credential(data, redis_url, "alice", "1")
            # An API key with a low limit of its own: it will be refused (429 rpm).
            api_key = credential(data, redis_url, "greedy", "--api-key", "--rpm", "3")
        scrapes, began, tally = asyncio.run(measure(base, token, api_key, args.seconds))
    finally:
        if procs is not None:
            procs.stop()
    statuses = ", ".join(f"{n} x {s}" for s, n in sorted(tally.statuses.items()))
    print(f"{sum(tally.statuses.values())} requests ({statuses}); {len(scrapes)} scrapes")
    title = (f"llama-proxy /metrics, scraped every second: {args.seconds:.0f} s of chat traffic "
             f"to the bundled SmolLM2-135M on {os.cpu_count()} CPU cores, 2 model slots")
    draw(scrapes, (began, args.seconds), args.out, title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
