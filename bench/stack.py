"""The processes a benchmark runs beside each other: Redis, the fake upstream, appliances, and
credentials from generate_token.py; every one logged to a file and stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.kit.helpers import REPO, free_port, http_status, wait_until


class Processes:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass(frozen=True)
class Stack:
    procs: Processes
    redis_sock: Path
    redis_url: str
    fake_port: int
    fake: str  # the fake upstream's base URL
    data: Path  # a data dir for the appliances: one signing secret for all of them


@contextmanager
def stack() -> Iterator[Stack]:
    """A work dir with Redis and the fake upstream running; whatever is started in it with
    stack.procs is stopped at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(Path(tmp))
        try:
            sock, redis_url = start_redis(procs)
            fake_port, fake = start_fake(procs)
            yield Stack(procs, sock, redis_url, fake_port, fake, Path(tmp) / "data")
        finally:
            procs.stop()


def start_redis(procs: Processes) -> tuple[Path, str]:
    """A plain redis-server on a UNIX socket: its socket path and URL."""
    sock = procs.work / "redis.sock"
    procs.start("redis", ["redis-server", "--port", "0", "--unixsocket", str(sock),
                          "--save", "", "--appendonly", "no"])
    wait_until(sock.exists, 10, "redis")
    return sock, f"unix://{sock}"


def start_fake(procs: Processes) -> tuple[int, str]:
    """The fake OpenAI upstream: its port and base URL."""
    port = free_port()
    procs.start("fake", [sys.executable, "-m", "tests.kit.fake_upstream", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(url + "/v1/models") == 200, 10, "the fake upstream")
    return port, url


def appliance(procs: Processes, name: str, upstream: str, redis_url: str, data: Path,
              *extra: str, cpus: str | None = None) -> tuple[str, int]:
    """`python -m proxy` fronting upstream; its base URL and pid once it is ready.

    The shipped rate limits are off: a benchmark passes the ones it measures in `extra`.
    cpus: run it (and its workers) on these CPUs only (taskset's list, "1" or "0-1").
    """
    port = free_port()
    no_limits = ["--limit-rpm", "0", "--limit-tpm", "0", "--limit-concurrency", "0",
                 "--limit-ip-rpm", "0"]
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = procs.start(name, [*pin, sys.executable, "-m", "proxy", "--port", str(port),
                              "--upstream", upstream, "--redis-url", redis_url, "--data-dir",
                              str(data), "--log-level", "warning", *no_limits, *extra])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(base + "/ready") == 200, 30, f"{name} to be ready")
    except AssertionError:
        log = (procs.work / f"{name}.log").read_text(errors="replace")
        raise SystemExit(f"{name} did not become ready; its log ends:\n{log[-2000:]}") from None
    return base, proc.pid


def credential(data: Path, redis_url: str, *args: str) -> str:
    """A JWT or API key from generate_token.py, as a user would get one (its last line)."""
    out = subprocess.run([sys.executable, "generate_token.py", "--data-dir", str(data), *args],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={"LLAMA_PROXY_REDIS_URL": redis_url, "PATH": os.defpath})
    return out.stdout.strip().splitlines()[-1]
