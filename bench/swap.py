"""What starting and swapping models costs (python -m bench.swap).

One appliance with a catalog of two entries of the bundled model and max_loaded = 1, so asking
for the other model stops the one running and starts it. Each round, time to the first token of
a streamed request: with the model unloaded (cold start: the child starts, loads the model, then
answers), with it loaded (warm), and for the other model while the first is loaded and idle (a
swap: one child stopped, the other started). Medians of 5 rounds, side by side with warm, and
the load seconds the catalog itself measured; written to bench/results/swap.md.
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from bench.stack import Processes
from config.paths import bundled_model
from tests.kit.helpers import free_port, wait_until

RESULTS = Path(__file__).with_name("results")
ADMIN = "b" * 40
ROUNDS = 5


def first_token(port: int, model: str) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Say hello"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    began = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    try:
        while line := resp.readline():
            if line.startswith(b"data: {") and b'"content":"' in line:
                return time.perf_counter() - began
        raise AssertionError("the stream ended without a token")
    finally:
        conn.close()


def admin(port: int, method: str, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=180) as resp:
        return json.loads(resp.read())


def measure(port: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cold": [], "warm": [], "swap": []}
    for _ in range(ROUNDS):
        for model in ("alpha", "beta"):
            admin(port, "POST", f"/admin/models/{model}/unload")
        times["cold"].append(first_token(port, "alpha"))
        times["warm"].append(first_token(port, "alpha"))
        times["swap"].append(first_token(port, "beta"))
    return times


def main() -> int:
    model = bundled_model()
    if model is None:
        print("the bundled model is not installed (make install)", file=sys.stderr)
        return 1
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        config = work / "config.toml"
        config.write_text(f'max_loaded = 1\n\n[models.alpha]\ngguf = "{model}"\n\n'
                          f'[models.beta]\ngguf = "{model}"\n')
        port = free_port()
        procs = Processes(work)
        try:
            procs.start("appliance", [sys.executable, "-m", "proxy", "--config", str(config),
                                      "--port", str(port), "--data-dir", str(work / "data"),
                                      "--auth", "disabled", "--admin-key", ADMIN,
                                      "--limit-rpm", "0", "--limit-tpm", "0",
                                      "--limit-ip-rpm", "0", "--limit-concurrency", "0"])
            wait_until(lambda: _up(port), 60, "the appliance")
            times = measure(port)
            loads = {row["id"]: row for row in admin(port, "GET", "/admin/models")["models"]}
        finally:
            procs.stop()
    load = sum(r["load_seconds"] for r in loads.values()) / sum(r["loads"] for r in
                                                                   loads.values())
    report = render(times, load)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "swap.md").write_text(report)
    return 0


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def render(times: dict[str, list[float]], load: float) -> str:
    warm = statistics.median(times["warm"])
    rows = [("warm: the model loaded", "warm"),
            ("cold start: the model unloaded", "cold"),
            ("swap: the other model loaded and idle (max_loaded = 1)", "swap")]
    lines = ["# Starting and swapping models",
             "",
             f"`python -m bench.swap`: the bundled model (SmolLM2-135M Q4_1) under two catalog "
             f"ids, `max_loaded = 1`; time to the first token of a streamed request, median of "
             f"{ROUNDS} rounds.",
             "",
             "| case | first token (s) | vs warm |",
             "| --- | --- | --- |"]
    for label, key in rows:
        median = statistics.median(times[key])
        lines.append(f"| {label} | {median:.3f} | {median / warm:.0f}x |")
    lines += ["", f"A start, as the catalog measured it (child started to healthy): "
              f"{load:.2f} s on average. A swap adds stopping the idle model (SIGTERM, its "
              f"exit) to a cold start.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
