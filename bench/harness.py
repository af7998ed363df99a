"""Side-by-side benchmark (`make bench`): the same load, in the same run, on the same machine,
against the upstream directly, nginx (the seeds' gateway), the least an aiohttp relay can do
(bench/floor.py: this design's floor), and this appliance with JWT auth and rate limits on, in
one worker and in two. Then the real model, direct and through the appliance.

Writes bench/results/latest.{json,csv,md,png} and prints the table and the targets.

    python -m bench.harness [--quick] [--skip-model]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.llm_benchmark import one as model_request
from bench.loadgen import Target, closed_loop, hold_streams, open_loop
from bench.stack import Processes, appliance, credential, stack
from config.paths import bundled_llama_server, bundled_model
from proxy.server import raise_open_files_limit
from tests.kit.helpers import REPO, free_port, http_status, wait_until

RESULTS = REPO / "bench" / "results"
ROUNDS = 3
CHAT = "/v1/chat/completions"
MESSAGES_API = "/v1/messages"
MESSAGES = [{"role": "user", "content": "hi"}]
# The example config's limits (requests and tokens per principal, requests per IP), set high
# enough never to refuse: their cost is what is measured.
LIMITS = ["--limit-rpm", "1000000000", "--limit-tpm", "1000000000000", "--limit-ip-rpm",
          "1000000000"]


def start_nginx(procs: Processes, upstream_port: int) -> str:
    prefix = procs.work / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = (REPO / "bench" / "nginx.conf").read_text()
    for key, value in (("{prefix}", str(prefix)), ("{port}", str(port)),
                       ("{upstream_port}", str(upstream_port))):
        conf = conf.replace(key, value)
    (prefix / "nginx.conf").write_text(conf)
    nginx = next((p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if Path(p).exists()), None)
    if nginx is None:
        raise SystemExit("nginx not found: run `make install` (it installs nginx-light)")
    procs.start("nginx", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(base + "/v1/models") == 200, 10, "nginx")
    return base


def start_floor(procs: Processes, upstream: str) -> str:
    """bench/floor.py: the least an aiohttp relay does, to show where this design's floor is."""
    port = free_port()
    procs.start("floor", [sys.executable, "-m", "bench.floor", "--upstream", upstream,
                          "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(base + "/v1/models") == 200, 10, "the aiohttp floor")
    return base


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_while(pid: int, action: Callable[[], Any]) -> tuple[Any, float]:
    """Run action while sampling the process's RSS; return its result and the peak in MB."""
    peak, done = [rss_mb(pid)], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return action(), max(peak)
    finally:
        done.set()
        sampler.join()


def proxy_scenarios(targets: dict[str, Target], seconds: float) -> dict[str, dict[str, dict]]:
    body = {"model": "fake-model", "messages": MESSAGES}
    stream = {**body, "stream": True, "fake": {"chunks": 100}}
    messages = {**stream, "max_tokens": 256}  # Anthropic's Messages API: typed events
    first_token = {**body, "stream": True, "fake": {"chunks": 3}}
    scenarios: dict[str, tuple[Callable[[Target], Any], str]] = {
        "whole c=1": (lambda t: closed_loop(t, body, 1, seconds), "latency added, one at a time"),
        "whole c=32": (lambda t: closed_loop(t, body, 32, seconds), "throughput"),
        "stream c=16": (lambda t: closed_loop(t, stream, 16, seconds), "chunks/s, 100 a stream"),
        "messages c=16": (lambda t: closed_loop(on_path(t, MESSAGES_API), messages, 16, seconds),
                          "/v1/messages chunks/s, 100 a stream"),
        "ttft c=1": (lambda t: closed_loop(t, first_token, 1, seconds), "time to first byte"),
        "open 300/s": (lambda t: open_loop(t, body, 300, seconds), "latency at a fixed rate"),
    }
    results: dict[str, dict[str, dict]] = {}
    for scenario, (run, what) in scenarios.items():
        print(f"  {scenario:12} ({what})", file=sys.stderr, flush=True)
        rounds: dict[str, list[dict]] = {system: [] for system in targets}
        for _ in range(ROUNDS):  # interleaved, so the machine's drift hits every system alike
            for system, target in targets.items():
                rounds[system].append(asyncio.run(run(target)).summary())
        results[scenario] = {system: median_of(runs) for system, runs in rounds.items()}
    return results


def on_path(target: Target, path: str) -> Target:
    """The same system, another of its API paths."""
    return replace(target, url=target.url.removesuffix(CHAT) + path)


def median_of(runs: list[dict]) -> dict[str, float]:
    """Each metric's median over the rounds; errors add up."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def thousand_streams(target: Target, pid: int) -> dict[str, float]:
    slow = {"model": "fake-model", "messages": MESSAGES, "stream": True,
            "fake": {"chunks": 10, "gap": 0.5}}
    before = rss_mb(pid)
    stats, peak = peak_while(pid, lambda: asyncio.run(hold_streams(target, slow, 1000)))
    return {"streams": 1000, "completed": len(stats.latencies), "errors": stats.errors,
            "rss_before_mb": before, "rss_peak_mb": peak, "rss_growth_mb": peak - before,
            "wall_s": stats.wall}


def model_scenarios(procs: Processes, redis_url: str, data: Path, token: str,
                    rounds: int) -> dict[str, dict[str, float]]:
    binary, model = bundled_llama_server(), bundled_model()
    assert binary and model, "run `make install` first"
    port, key = free_port(), secrets.token_urlsafe(16)
    procs.start("llama-server", [str(binary), "--model", str(model), "--alias", "smollm2",
                                 "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
                                 "--parallel", "4", "--ctx-size", "4096", "--no-webui"])
    direct = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(direct + "/health") == 200, 60, "llama-server")
    base, _ = appliance(procs, "appliance-model", direct, redis_url, data, *LIMITS,
                        "--upstream-api-key", key)
    out: dict[str, dict[str, float]] = {}
    for concurrency in (1, 2, 4):
        rates: dict[str, list[float]] = {"direct": [], "appliance": []}
        for _ in range(rounds):  # interleaved, so drift hits both alike
            for system, url, secret in (("direct", direct, key), ("appliance", base, token)):
                print(f"  model c={concurrency} -> {system}", file=sys.stderr, flush=True)
                args = argparse.Namespace(base_url=url, api_key=secret, model="smollm2",
                                          max_tokens=96, ignore_eos=True)
                results = asyncio.run(_model_round(args, concurrency))
                rates[system] += [r.tokens_per_s for r in results if r.ok]
                if any(not r.ok for r in results):
                    raise RuntimeError(f"model request failed via {system}: {results}")
        out[f"c={concurrency}"] = {s: statistics.fmean(v) for s, v in rates.items()}
    return out


async def _model_round(args: argparse.Namespace, concurrency: int) -> list[Any]:
    import aiohttp

    from bench.llm_benchmark import Result

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        jobs = [model_request(http, args, i) for i in range(concurrency * 3)]
        sem = asyncio.Semaphore(concurrency)

        async def limited(job: Any) -> Result:
            async with sem:
                return await job

        return await asyncio.gather(*(limited(j) for j in jobs))


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="0.7 s a round instead of 1.5 (3 interleaved rounds a scenario)")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    seconds = 0.7 if args.quick else 1.5
    started = time.monotonic()
    report: dict[str, Any] = {"machine": machine()}
    with stack() as run:
        procs, redis_url, fake, data = run.procs, run.redis_url, run.fake, run.data
        nginx = start_nginx(procs, run.fake_port)
        floor = start_floor(procs, fake)
        one_worker, one_pid = appliance(procs, "appliance", fake, redis_url, data, *LIMITS)
        two_workers, _ = appliance(procs, "appliance-2w", fake, redis_url, data, *LIMITS,
                                   "--workers", "2")
        time.sleep(1.5)  # the second worker's first upstream check
        token = credential(data, redis_url, "bench", "2")
        bearer = {"Authorization": f"Bearer {token}"}
        targets = {"direct": Target(fake + CHAT), "nginx": Target(nginx + CHAT),
                   "aiohttp floor": Target(floor + CHAT),
                   "appliance": Target(one_worker + CHAT, bearer),
                   "appliance x2": Target(two_workers + CHAT, bearer)}
        print("proxy mechanics against the fake upstream:", file=sys.stderr)
        report["scenarios"] = proxy_scenarios(targets, seconds)
        report["method"] = (f"{ROUNDS} interleaved rounds of {seconds} s per scenario and "
                            "system; medians")
        print("  1000 open streams -> appliance", file=sys.stderr, flush=True)
        report["streams_1000"] = thousand_streams(targets["appliance"], one_pid)
        if not args.skip_model:
            print("the real model (SmolLM2-135M, 96 tokens, ignore_eos):", file=sys.stderr)
            report["model"] = model_scenarios(procs, redis_url, data, token,
                                              1 if args.quick else 3)
    report["bench_seconds"] = time.monotonic() - started
    write_outputs(report)
    print((RESULTS / "latest.md").read_text())
    return 0


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b and not math.isnan(a) and not math.isnan(b) else "-"


def table(report: dict[str, Any]) -> str:
    s = report["scenarios"]
    systems = list(s["whole c=1"])
    rows = [
        ("req/s, whole answers, c=32", lambda x: s["whole c=32"][x]["req_per_s"], "{:.0f}"),
        ("p50 ms, whole, c=1", lambda x: s["whole c=1"][x]["p50_ms"], "{:.3f}"),
        ("p99 ms, whole, c=1", lambda x: s["whole c=1"][x]["p99_ms"], "{:.3f}"),
        ("chunks/s, streams, c=16", lambda x: s["stream c=16"][x]["chunks_per_s"], "{:.0f}"),
        ("chunks/s, /v1/messages streams, c=16",
         lambda x: s["messages c=16"][x]["chunks_per_s"], "{:.0f}"),
        ("TTFT p50 ms, c=1", lambda x: s["ttft c=1"][x]["ttft_p50_ms"], "{:.3f}"),
        ("p50 ms at 300 req/s", lambda x: s["open 300/s"][x]["p50_ms"], "{:.3f}"),
        ("p99 ms at 300 req/s", lambda x: s["open 300/s"][x]["p99_ms"], "{:.3f}"),
        ("errors (all runs)", lambda x: sum(s[k][x]["errors"] for k in s), "{:.0f}"),
    ]
    lines = [f"Machine: {report['machine']}. {report['method']}.", "",
             "| metric | " + " | ".join(systems) + " | appliance / direct | appliance / nginx |"
             " floor / nginx |",
             "|---" * (len(systems) + 4) + "|"]
    for label, get, fmt in rows:
        values = [get(x) for x in systems]
        lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) +
                     f" | {ratio(get('appliance'), get('direct'))} | "
                     f"{ratio(get('appliance'), get('nginx'))} | "
                     f"{ratio(get('aiohttp floor'), get('nginx'))} |")
    st = report["streams_1000"]
    lines += ["", f"1000 concurrent slow streams through the appliance: {st['completed']} "
              f"completed, {st['errors']} errors, RSS {st['rss_before_mb']:.0f} -> "
              f"{st['rss_peak_mb']:.0f} MB (+{st['rss_growth_mb']:.0f} MB)."]
    if "model" in report:
        lines += ["", "| real model, tokens/s per request | direct | appliance | ratio |",
                  "|---|---|---|---|"]
        for c, v in report["model"].items():
            lines.append(f"| {c} | {v['direct']:.1f} | {v['appliance']:.1f} | "
                         f"{ratio(v['appliance'], v['direct'])} |")
    lines += ["", *targets(report), "", f"(bench took {report['bench_seconds']:.0f} s)"]
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> list[str]:
    s = report["scenarios"]

    def of_nginx(system: str, scenario: str, metric: str) -> float:
        return s[scenario][system][metric] / s[scenario]["nginx"][metric]

    def of_direct(system: str, scenario: str, metric: str) -> float:
        return s[scenario][system][metric] / s[scenario]["direct"][metric]

    def added_p50(system: str) -> float:
        return s["whole c=1"][system]["p50_ms"] - s["whole c=1"]["direct"]["p50_ms"]

    whole = of_nginx("appliance", "whole c=32", "req_per_s")
    added = added_p50("appliance")
    chunks = of_nginx("appliance", "stream c=16", "chunks_per_s")
    # Each relative to the fake directly: the fake makes Anthropic's typed events more slowly
    # than chat chunks, which says nothing of the appliance.
    messages = (of_direct("appliance", "messages c=16", "chunks_per_s")
                / of_direct("appliance", "stream c=16", "chunks_per_s"))
    ttft = s["ttft c=1"]["appliance"]["ttft_p50_ms"] - s["ttft c=1"]["direct"]["ttft_p50_ms"]
    streams = report["streams_1000"]
    checks = [
        ("non-streamed req/s vs nginx (target >= 35%)", f"{whole:.0%}", whole >= 0.35),
        ("added p50 over direct at c=1 (target < 1 ms)", f"{added:.3f} ms", added < 1.0),
        ("streamed chunks/s vs nginx (target >= 80%)", f"{chunks:.0%}", chunks >= 0.80),
        ("/v1/messages streams vs chat completions', each as a share of the fake's own "
         "chunks/s (target >= 90%)", f"{messages:.0%}", messages >= 0.90),
        ("TTFT added at p50 (target < 2 ms)", f"{ttft:.3f} ms", ttft < 2.0),
        ("1000 open streams: errors (target 0)", str(streams["errors"]), streams["errors"] == 0),
        ("1000 open streams: RSS growth (target < 50 MB)", f"{streams['rss_growth_mb']:.1f} MB",
         streams["rss_growth_mb"] < 50),
    ]
    for c, v in report.get("model", {}).items():
        share = v["appliance"] / v["direct"]
        checks.append((f"model tokens/s vs direct, {c} (target >= 97%)", f"{share:.1%}",
                       share >= 0.97))
    floor = "aiohttp floor"
    return (["Targets:"] + [f"- {'met' if ok else 'NOT MET'}: {label}: {shown}"
                            for label, shown, ok in checks]
            + [f"(The aiohttp floor in the same run: "
               f"{of_nginx(floor, 'whole c=32', 'req_per_s'):.0%} of nginx's req/s, "
               f"+{added_p50(floor):.3f} ms p50 at c=1, "
               f"{of_nginx(floor, 'stream c=16', 'chunks_per_s'):.0%} of its chunks/s.)"])


def write_outputs(report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2))
    with (RESULTS / "latest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["scenario", "system", "metric", "value"])
        for scenario, systems in report["scenarios"].items():
            for system, metrics in systems.items():
                for metric, value in metrics.items():
                    writer.writerow([scenario, system, metric, value])
        for c, values in report.get("model", {}).items():
            for system, value in values.items():
                writer.writerow([f"model {c}", system, "tokens_per_s", value])
    (RESULTS / "latest.md").write_text(table(report))
    chart(report)


def chart(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["scenarios"]
    systems = list(s["whole c=1"])
    model = report.get("model", {})
    fig, axes = plt.subplots(1, 4 if model else 3, figsize=(18 if model else 14, 4.2))
    panels = [
        ("Throughput (higher is better)", [("req/s whole c=32", "whole c=32", "req_per_s"),
                                           ("chunks/s / 10, c=16", "stream c=16",
                                            "chunks_per_s"),
                                           ("/v1/messages chunks/s / 10", "messages c=16",
                                            "chunks_per_s")]),
        ("Latency, one at a time (ms)", [("p50 whole", "whole c=1", "p50_ms"),
                                         ("TTFT p50", "ttft c=1", "ttft_p50_ms")]),
        ("Latency at 300 req/s (ms)", [("p50", "open 300/s", "p50_ms"),
                                       ("p99", "open 300/s", "p99_ms")]),
    ]
    if model:
        ax = axes[3]
        for i, system in enumerate(("direct", "appliance")):
            ax.bar([j + i * 0.4 for j in range(len(model))], [v[system] for v in model.values()],
                   0.4, label=system)
        ax.set_xticks([j + 0.2 for j in range(len(model))])
        ax.set_xticklabels(list(model), fontsize=8)
        ax.set_title("Real model: tokens/s per request", fontsize=10)
        ax.legend(fontsize=8)
    for ax, (title, series) in zip(axes, panels, strict=False):
        width = 0.8 / len(series)
        for i, (label, scenario, metric) in enumerate(series):
            values = [s[scenario][x][metric] for x in systems]
            if metric == "chunks_per_s":
                values = [v / 10 for v in values]
            ax.bar([j + i * width for j in range(len(systems))], values, width, label=label)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(systems))])
        ax.set_xticklabels(systems, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"llama-proxy vs direct and nginx - {report['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
