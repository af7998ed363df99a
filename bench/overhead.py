"""What the appliance, authentication and rate limits add per request: the fake upstream directly,
then the appliance with auth off, with a JWT, with an API key, and with a JWT plus every rate limit;
one request at a time, non-streamed, same machine, same run, the paths interleaved in rounds so a
busy moment does not land on one of them. Round trips to Redis are the appliance's own count
(/metrics); Redis commands per request are read from the Redis server's own counters.

    python -m bench.overhead [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench.llm_benchmark import percentile
from bench.stack import appliance, credential, stack

BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})


ROUND_TRIP_COMMANDS = ("evalsha", "eval", "exists", "hgetall", "hset", "script|load", "script")


def redis_commands(sock: Path) -> int:
    """Calls the appliance made to the bench Redis so far: scripts count once, not the commands
    they run inside."""
    out = subprocess.run(["redis-cli", "-s", str(sock), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    calls = 0
    for line in out.splitlines():
        name, _, stats = line.partition(":")
        if name.removeprefix("cmdstat_") in ROUND_TRIP_COMMANDS:
            calls += int(stats.split(",")[0].split("=")[1])
    return calls


async def measure(url: str, headers: dict[str, str], requests: int) -> list[float]:
    headers = {"Content-Type": "application/json", **headers}
    out: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        for i in range(requests + requests // 10):  # the first tenth warms up
            started = time.perf_counter()
            async with http.post(url + "/v1/chat/completions", data=BODY) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")
            if i >= requests // 10:
                out.append(time.perf_counter() - started)
    return out


def round_trips(base: str) -> float:
    """The appliance's own count of its round trips to Redis for the limits (from /metrics,
    open on loopback): Redis's command counters cannot tell a batch from single calls."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r"^llama_proxy_limit_round_trips_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="each path is measured in this many slices, the order rotated "
                        "each round, so drift on a busy machine does not favour one path")
    args = parser.parse_args(argv)
    per_round = max(args.requests // args.rounds, 50)
    with stack() as run:
        procs, sock, redis_url, fake = run.procs, run.redis_sock, run.redis_url, run.fake
        open_base, _ = appliance(procs, "open", fake, redis_url, procs.work / "open",
                                 "--auth", "disabled")
        data = run.data  # one data dir: one signing secret for both below
        auth_base, _ = appliance(procs, "auth", fake, redis_url, data)
        limits = ["--limit-rpm", "1000000", "--limit-tpm", "1000000000",
                  "--limit-ip-rpm", "1000000", "--limit-concurrency", "1000"]
        limited_base, _ = appliance(procs, "limited", fake, redis_url, data, *limits)
        token = credential(data, redis_url, "bench", "1")
        key = credential(data, redis_url, "bench", "--api-key")
        bearer = {"Authorization": f"Bearer {token}"}
        runs = [("upstream directly", fake, {}), ("appliance, auth off", open_base, {}),
                ("appliance, JWT", auth_base, bearer),
                ("appliance, API key", auth_base, {"X-API-Key": key}),
                ("JWT + rate limits", limited_base, bearer)]
        results: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        medians: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        commands = dict.fromkeys(results, 0.0)
        trips = dict.fromkeys(results, 0.0)
        for turn in range(args.rounds):
            shift = turn % len(runs)
            for name, url, headers in runs[shift:] + runs[:shift]:
                before, trips_before = redis_commands(sock), _trips(url, fake)
                lat = asyncio.run(measure(url, headers, per_round))
                time.sleep(0.3)  # the last settlement goes out within 0.2 s
                sent = per_round + per_round // 10  # warm-up included
                commands[name] += (redis_commands(sock) - before) / sent / args.rounds
                trips[name] += (_trips(url, fake) - trips_before) / sent / args.rounds
                results[name] += lat
                medians[name].append(percentile(lat, 0.5))
    report(results, medians, commands, trips, args.rounds)
    return 0


def _trips(url: str, fake: str) -> float:
    return 0.0 if url == fake else round_trips(url)


def report(results: dict[str, list[float]], medians: dict[str, list[float]],
           commands: dict[str, float], trips: dict[str, float], rounds: int) -> None:
    base = percentile(results["appliance, auth off"], 0.5)
    jwt = percentile(results["appliance, JWT"], 0.5)
    count = len(next(iter(results.values())))
    print(f"{count} sequential non-streamed requests per path in {rounds} interleaved rounds "
          "(latency in ms)")
    print(f"{'':22} {'p50':>7} {'rounds':>13} {'p90':>7} {'p99':>7} {'req/s':>7} "
          f"{'vs auth off':>12} {'vs JWT':>8} {'trips/req':>10} {'cmds/req':>9}")
    print("(rounds: the lowest and highest p50 of the rounds; trips: round trips to Redis for "
          "the limits, checks and settlements batched; cmds: Redis commands)")
    for name, lat in results.items():
        p50 = percentile(lat, 0.5)
        spread = f"{min(medians[name]) * 1000:.2f}-{max(medians[name]) * 1000:.2f}"
        appliance_path = "auth off" not in name and "direct" not in name
        extra = f"{(p50 - base) * 1000:+.3f}" if appliance_path else ""
        versus = f"{(p50 - jwt) * 1000:+.3f}" if appliance_path and "JWT" != name[-3:] else ""
        print(f"{name:22} {p50 * 1000:7.3f} {spread:>13} {percentile(lat, 0.9) * 1000:7.3f} "
              f"{percentile(lat, 0.99) * 1000:7.3f} {len(lat) / sum(lat):7.0f} {extra:>12} "
              f"{versus:>8} {max(trips[name], 0):10.2f} {max(commands[name], 0):9.2f}")


if __name__ == "__main__":
    sys.exit(main())
