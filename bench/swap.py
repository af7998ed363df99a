"""What starting and swapping models costs (python -m bench.swap).

One appliance with a catalog of two entries of the bundled model and max_loaded = 1, so asking
for the other model stops the one running and starts it. Each round, time to the first token of
a streamed request: with the model unloaded (cold start: the child starts, loads the model, then
answers), with it loaded (warm), and for the other model while the first is loaded and idle (a
swap: one child stopped, the other started). Medians of 5 rounds, side by side with warm, and
the load seconds the catalog itself measured. Then a ~3,800-token conversation whose model is
swapped out and back, its next turn with the slots saved and restored and without. Written to
bench/results/swap.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.stack import Processes
from config.paths import bundled_model
from tests.kit.helpers import free_port, wait_until

RESULTS = Path(__file__).with_name("results")
ADMIN = "b" * 40
ROUNDS = 5


HELLO = [{"role": "user", "content": "Say hello"}]
STORY = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near river {i}."
                 for i in range(180))  # about 3,800 tokens with the chat template
CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Read this: " + STORY},
                {"role": "assistant", "content": "Done."}]


def first_token(port: int, model: str, messages: list[dict[str, str]] | None = None
                ) -> tuple[float, dict[str, Any]]:
    """Seconds from sending a streamed request to its first content chunk, and the timings
    llama-server reports at its end (cache_n: prompt tokens read from the KV cache)."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 8, "temperature": 0,
                       "stream_options": {"include_usage": True},
                       "messages": messages or HELLO})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    began = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first, timings = None, {}
    try:
        while line := resp.readline():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and b'"content":"' in line:
                first = time.perf_counter() - began
            timings = event.get("timings") or timings
    finally:
        conn.close()
    assert first is not None, "the stream ended without a token"
    return first, timings


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
        times["cold"].append(first_token(port, "alpha")[0])
        times["warm"].append(first_token(port, "alpha")[0])
        times["swap"].append(first_token(port, "beta")[0])
    return times


def next_turn_after_a_swap(port: int) -> dict[str, Any]:
    """A ~3,800-token conversation read once, its model swapped out and back (unload, then
    load: the start is not in the figure), then its next turn: first token and cache_n."""
    first_token(port, "alpha", CONVERSATION[:2])
    admin(port, "POST", "/admin/models/alpha/unload")
    admin(port, "POST", "/admin/models/alpha/load")
    seconds, timings = first_token(port, "alpha", [
        *CONVERSATION, {"role": "user", "content": "What was on line 7?"}])
    return {"seconds": seconds, "cache_n": timings.get("cache_n"),
            "prompt_n": timings.get("prompt_n")}


def main() -> int:
    model = bundled_model()
    if model is None:
        print("the bundled model is not installed (make install)", file=sys.stderr)
        return 1
    tables = (f'max_loaded = 1\n\n[models.alpha]\ngguf = "{model}"\n\n'
              f'[models.beta]\ngguf = "{model}"\n')
    with appliance_with(tables) as port:
        times = measure(port)
        loads = {row["id"]: row for row in admin(port, "GET", "/admin/models")["models"]}
    # One slot with room for the conversation, its cache saved and restored or not.
    long = f'[models.alpha]\ngguf = "{model}"\nctx_size = 4096\nparallel = 1\n'
    restore = {}
    for saved in (True, False):
        with appliance_with(long, "--slot-save", str(saved).lower()) as port:
            restore[saved] = next_turn_after_a_swap(port)
    load = sum(r["load_seconds"] for r in loads.values()) / sum(r["loads"] for r in
                                                                   loads.values())
    report = render(times, load, restore)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "swap.md").write_text(report)
    return 0


@contextlib.contextmanager
def appliance_with(config_text: str, *args: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        config = work / "config.toml"
        config.write_text(config_text)
        port = free_port()
        procs = Processes(work)
        try:
            procs.start("appliance", [sys.executable, "-m", "proxy", "--config", str(config),
                                      "--port", str(port), "--data-dir", str(work / "data"),
                                      "--auth", "disabled", "--admin-key", ADMIN,
                                      "--limit-rpm", "0", "--limit-tpm", "0",
                                      "--limit-ip-rpm", "0", "--limit-concurrency", "0", *args])
            wait_until(lambda: _up(port), 60, "the appliance")
            yield port
        finally:
            procs.stop()


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def render(times: dict[str, list[float]], load: float, restore: dict[bool, dict[str, Any]]
           ) -> str:
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
              f"exit) to a cold start.", "",
              "## The next turn of a long conversation after its model was swapped out",
              "",
              "A conversation of about 3,800 prompt tokens (one slot, `ctx_size = 4096`), its "
              "model unloaded and loaded again, then its next turn: first token, and the prompt "
              "tokens llama-server read from the KV cache (`cache_n`) or computed (`prompt_n`).",
              "",
              "| slots saved and restored | first token (s) | cache_n | prompt_n |",
              "| --- | --- | --- | --- |"]
    for saved, label in ((True, "yes (`slot_save`, the default)"), (False, "no")):
        row = restore[saved]
        lines.append(f"| {label} | {row['seconds']:.3f} | {row['cache_n']} | "
                     f"{row['prompt_n']} |")
    ratio = restore[False]["seconds"] / restore[True]["seconds"]
    lines += ["", f"Restored: {ratio:.0f}x faster to the first token.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
