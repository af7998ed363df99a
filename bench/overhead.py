"""What the appliance, authentication and rate limits add per request: the fake upstream directly,
then the appliance with auth off, with a JWT, with an API key, and with a JWT plus every rate limit;
one request at a time, non-streamed, same machine, same run. Redis commands per request are read
from the Redis server's own counters.

    python -m bench.overhead [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.llm_benchmark import percentile
from bench.stack import Processes, appliance, credential, start_fake, start_redis

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp))
        try:
            sock, redis_url = start_redis(procs)
            _, fake = start_fake(procs)
            open_base, _ = appliance(procs, "open", fake, redis_url, procs.work / "open",
                                     "--auth", "disabled")
            data = procs.work / "data"  # one data dir: one signing secret for both below
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
            results, commands = {}, {}
            for name, url, headers in runs:
                before = redis_commands(sock)
                results[name] = asyncio.run(measure(url, headers, args.requests))
                time.sleep(0.2)  # let settlement after the last response land
                sent = args.requests + args.requests // 10  # warm-up included
                commands[name] = (redis_commands(sock) - before) / sent
        finally:
            procs.stop()
    base = percentile(results["appliance, auth off"], 0.5)
    print(f"{args.requests} sequential non-streamed requests each (latency in ms)")
    print(f"{'':22} {'p50':>7} {'p90':>7} {'p99':>7} {'req/s':>7} {'vs auth off':>12} "
          f"{'redis/req':>10}")
    print("(redis/req: round trips to Redis per request; with limits: admit + settle afterwards)")
    for name, lat in results.items():
        p50 = percentile(lat, 0.5)
        extra = "" if "auth off" in name or "direct" in name else f"{(p50 - base) * 1000:+.3f}"
        print(f"{name:22} {p50 * 1000:7.3f} {percentile(lat, 0.9) * 1000:7.3f} "
              f"{percentile(lat, 0.99) * 1000:7.3f} {len(lat) / sum(lat):7.0f} {extra:>12} "
              f"{max(commands[name], 0):10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
