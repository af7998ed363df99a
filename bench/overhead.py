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
from tests.helpers import REPO, free_port, http_status, wait_until

BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def appliance(work: Path, upstream: str, redis_url: str, *extra: str) -> tuple[str, object]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    proc = start([sys.executable, "-m", "proxy", "--port", str(port), "--upstream", upstream,
                  "--redis-url", redis_url, "--data-dir", str(work / "data"),
                  "--log-level", "warning", *extra], work / f"proxy-{port}.log")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(base + "/ready") == 200, 30, "the appliance")
    return base, proc


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


def issue(work: Path, redis_url: str, *args: str) -> str:
    """A credential from generate_token.py, as a user would get it."""
    result = subprocess.run(
        [sys.executable, "generate_token.py", "--data-dir", str(work / "auth" / "data"), *args],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={"LLAMA_PROXY_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"})
    return result.stdout.strip().splitlines()[-1]


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
    procs: list[object] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            sock = work / "redis.sock"
            procs.append(start(["redis-server", "--port", "0", "--unixsocket", str(sock),
                                "--save", ""], work / "redis.log"))
            wait_until(sock.exists, 10, "redis")
            redis_url = f"unix://{sock}"
            fake_port = free_port()
            procs.append(start([sys.executable, "-m", "bench.fake_upstream", "--port",
                                str(fake_port)], work / "fake.log"))
            fake = f"http://127.0.0.1:{fake_port}"
            wait_until(lambda: http_status(fake + "/v1/models") == 200, 10, "the fake upstream")
            open_base, p1 = appliance(work / "open", fake, redis_url, "--auth", "disabled")
            auth_base, p2 = appliance(work / "auth", fake, redis_url)
            limits = ["--limit-rpm", "1000000", "--limit-tpm", "1000000000",
                      "--limit-ip-rpm", "1000000", "--limit-concurrency", "1000"]
            # Same data dir as the JWT one: the same signing secret.
            limited_base, p3 = appliance(work / "auth", fake, redis_url, *limits)
            procs += [p1, p2, p3]
            token = issue(work, redis_url, "bench", "1")
            key = issue(work, redis_url, "bench", "--api-key")
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
            for proc in procs:
                proc.terminate()  # type: ignore[attr-defined]
                proc.wait(10)  # type: ignore[attr-defined]
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
