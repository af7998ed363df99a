"""What --workers buys: requests/s of 1 and 2 workers with the load generator, the fake upstream
and Redis on one core and the appliance on the others (taskset), same run, interleaved rounds.

    python -m bench.workers [--seconds 3] [--rounds 3]

On a 2-core machine the appliance gets one core whichever the worker count, so the ratio shows
what a second process costs or gains on one core; with more cores, give it more
(--appliance-cpus 1-3) to see it scale.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from bench.harness import CHAT, LIMITS, MESSAGES
from bench.loadgen import Target, closed_loop
from bench.stack import appliance, credential, stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--load-cpus", default="0")
    parser.add_argument("--appliance-cpus", default="1")
    args = parser.parse_args(argv)
    load_cpus = parse_cpus(args.load_cpus)
    os.sched_setaffinity(0, load_cpus)  # this process (the load) and what it starts next
    with stack() as run:
        procs, redis_url, fake, data = run.procs, run.redis_url, run.fake, run.data
        systems = {}
        for workers in (1, 2):
            base, _ = appliance(procs, f"w{workers}", fake, redis_url, data, *LIMITS,
                                "--workers", str(workers), cpus=args.appliance_cpus)
            systems[workers] = base
        time.sleep(1.5)  # the second worker's first upstream check
        token = credential(data, redis_url, "bench", "1")
        headers = {"Authorization": f"Bearer {token}"}
        payload = {"model": "fake-model", "messages": MESSAGES}
        rates: dict[int, list[float]] = {1: [], 2: []}
        for turn in range(args.rounds):
            for workers in ((1, 2) if turn % 2 == 0 else (2, 1)):
                stats = asyncio.run(closed_loop(Target(systems[workers] + CHAT, headers),
                                                payload, args.concurrency, args.seconds))
                if stats.errors:
                    raise SystemExit(f"{stats.errors} errors: {stats.error_samples[:3]}")
                rates[workers].append(len(stats.latencies) / stats.wall)
    one, two = (statistics.median(rates[w]) for w in (1, 2))
    print(f"load on CPUs {args.load_cpus}, the appliance on CPUs {args.appliance_cpus}; "
          f"closed loop c={args.concurrency}, whole answers, JWT and rate limits on; medians "
          f"of {args.rounds} rounds of {args.seconds:g} s")
    print(f"1 worker:  {one:7.0f} req/s   {[round(r) for r in rates[1]]}")
    print(f"2 workers: {two:7.0f} req/s   {[round(r) for r in rates[2]]}")
    print(f"2 workers / 1 worker: {two / one:.2f}")
    return 0


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


if __name__ == "__main__":
    sys.exit(main())
