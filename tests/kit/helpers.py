"""Small helpers shared by the tests: ports, waiting, and the appliance as a real process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
               ) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def redis_servers_with(path: Path) -> list[int]:
    """Live redis-server processes whose command line names this path (a data dir, a
    socket)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in cmdline and str(path).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# The shipped rate limits, turned off for tests about something else (flags still win).
NO_LIMITS_ENV = {"LLAMA_PROXY_LIMIT_RPM": "0", "LLAMA_PROXY_LIMIT_TPM": "0",
                 "LLAMA_PROXY_LIMIT_CONCURRENCY": "0", "LLAMA_PROXY_LIMIT_IP_RPM": "0"}


class Appliance:
    """`python -m proxy` as users run it, with its log captured to a file.

    Rate limits are off unless the test passes its own or asks for the shipped defaults.
    """

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 data_dir: Path | None = None, default_limits: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "appliance.log"
        self.data_dir = data_dir or tmp / "data"
        cmd = [sys.executable, "-m", "proxy", "--port", str(self.port),
               "--data-dir", str(self.data_dir), *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_PROXY_")}
        if not default_limits:
            full_env.update(NO_LIMITS_ENV)
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started llama-server \(pid (\d+)\)", self.log)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"appliance exited early:\n{self.log}")
            return http_status(f"{self.base}/ready") == 200
        wait_until(ready, timeout, "the appliance to be ready")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def eventually(predicate: Callable[[], Any], limit: float, what: str) -> Any:
    """wait_until for async tests: the event loop keeps running while we wait; the predicate
    may be a coroutine function."""
    import asyncio
    import inspect

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")
