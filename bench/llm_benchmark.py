"""Benchmark any OpenAI-compatible deployment: time to first token, tokens/s, latency percentiles.

    python bench/llm_benchmark.py --base-url http://127.0.0.1:8000 --api-key KEY \
        --requests 20 --concurrency 4 --max-tokens 128

Writes benchmark.json (summary and every request) and benchmark.csv (one row per request).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

PROMPT = "Write a short story about a lighthouse keeper and a storm."


@dataclass
class Result:
    index: int
    ok: bool
    status: int
    ttft_s: float
    latency_s: float
    completion_tokens: int
    tokens_per_s: float
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def chat_url(base: str) -> str:
    base = base.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


async def one(http: aiohttp.ClientSession, args: argparse.Namespace, index: int) -> Result:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7}
    if args.model:
        body["model"] = args.model
    if args.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    started = time.perf_counter()
    ttft, pieces, usage_tokens = 0.0, 0, 0
    try:
        async with http.post(chat_url(args.base_url), json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return Result(index, False, resp.status, 0, time.perf_counter() - started, 0, 0,
                              text)
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(str(event["error"])[:200])
                if event.get("usage"):
                    usage_tokens = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        pieces += 1
                        if not ttft:
                            ttft = time.perf_counter() - started
    except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as exc:
        return Result(index, False, 0, ttft, time.perf_counter() - started, 0, 0, repr(exc))
    latency = time.perf_counter() - started
    tokens = usage_tokens or pieces
    decode = latency - ttft
    rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
    return Result(index, True, 200, ttft, latency, tokens, rate)


def progress(done: int, total: int) -> None:
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests")
    sys.stderr.flush()


async def run(args: argparse.Namespace) -> tuple[dict, list[Result]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=args.timeout)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            results.append(await one(http, args, index))
            progress(len(results), args.requests)

    progress(0, args.requests)
    # force_close: llama-server drops keep-alive connections after a stream, and a reused one
    # fails; a fresh connection per request costs the same on every target.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    sys.stderr.write("\n")
    return summarise(results, wall, args), sorted(results, key=lambda r: r.index)


def summarise(results: list[Result], wall: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "base_url": args.base_url, "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "ok": len(ok), "errors": len(results) - len(ok),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "latency_p50_s": percentile(lat, 0.5), "latency_p90_s": percentile(lat, 0.9),
        "latency_p99_s": percentile(lat, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p90_s": percentile(ttft, 0.9),
        "tokens_per_s_per_request": statistics.fmean(r.tokens_per_s for r in ok) if ok else 0.0,
        "tokens_per_s_total": tokens / wall if wall else 0.0,
        "completion_tokens": tokens,
    }


def write_outputs(summary: dict, results: list[Result], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(
        {"summary": summary, "results": [asdict(r) for r in results]}, indent=2))
    with (out_dir / "benchmark.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(results[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="")
    p.add_argument("--model", default="")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask llama-server to always generate max-tokens (steadier numbers)")
    p.add_argument("--timeout", type=float, default=300, help="longest silent gap (s)")
    p.add_argument("--out-dir", type=Path, default=Path("."))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary, results = asyncio.run(run(args))
    write_outputs(summary, results, args.out_dir)
    for key, value in summary.items():
        print(f"{key:26} {value:.4f}" if isinstance(value, float) else f"{key:26} {value}")
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
