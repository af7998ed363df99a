"""Supervise llama-server as a child process.

States live on the child's Backend: starting -> ready, and after a crash starting again (with
exponential backoff) until too many crashes in a window turn it failed. The child runs in its own
process group on a free loopback port, protected by a random API key kept in an owner-only file,
and dies with us even if we are SIGKILLed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import time
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout

from config import Settings
from proxy.backends import Backend, State
from proxy.logs import RedactingFilter, register_secret

log = logging.getLogger("proxy.supervisor")
child_log = logging.getLogger("llama-server")

BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
HEALTH_POLL = 0.1
TAIL_LINES = 30
LOG_FILE_BYTES = 10 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Runs in a child before exec: SIGKILL it when the appliance goes away (even by SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def write_private(path: Path, text: str) -> None:
    """Create or replace a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


class LlamaSupervisor:
    def __init__(self, settings: Settings, client: ClientSession, backend: Backend) -> None:
        self.settings = settings
        self.client = client
        self.backend = backend
        self.ready = asyncio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._crashes: list[float] = []
        self._key_file = settings.data_dir / "llama-server.key"
        # One port for the child's whole life: worker processes reach it there across restarts.
        self.port = free_loopback_port()
        backend.base_url = f"http://127.0.0.1:{self.port}"
        backend.api_key = secrets.token_urlsafe(32)
        register_secret(backend.api_key)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        write_private(self._key_file, self.backend.api_key + "\n")
        self._attach_log_file()
        self._task = asyncio.create_task(self._run(), name="llama-supervisor")

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after the grace period."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.info("stopping llama-server (pid %d)", proc.pid)
            self._signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.settings.child_stop_grace)
            except TimeoutError:
                log.warning("llama-server ignored SIGTERM for %.0fs; killing it",
                            self.settings.child_stop_grace)
                self._signal_group(proc, signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.backend.set_state(State.STOPPED)

    # -- the restart loop ------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            reason = await self._run_once()
            if self._stopping:
                return
            now = time.monotonic()
            window = self.settings.restart_window
            self._crashes = [t for t in self._crashes if now - t < window] + [now]
            last = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
            if len(self._crashes) >= self.settings.restart_limit:
                why = f"{reason}; gave up after {len(self._crashes)} crashes in {window:.0f}s"
                self.backend.set_state(State.FAILED, why)
                log.error("llama-server %s. Last output:\n%s", why, last)
                return
            delay = min(BACKOFF_BASE * 2 ** (len(self._crashes) - 1), BACKOFF_MAX)
            self.backend.set_state(State.STARTING, f"{reason}; restarting in {delay:.0f}s")
            log.error("llama-server %s; restarting in %.0fs. Last output:\n%s", reason, delay, last)
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """Start one child, wait until it is healthy, then until it exits; say why it ended."""
        port = self.port
        self.backend.set_state(State.STARTING, "loading model")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self._command(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._proc = proc
        log.info("started llama-server (pid %d) on 127.0.0.1:%d", proc.pid, port)
        pump = asyncio.create_task(self._pump(proc))
        try:
            if await self._wait_healthy(proc, started):
                self.backend.set_state(State.READY)
                log.info("llama-server ready in %.2fs (model %s)", time.monotonic() - started,
                         self.settings.model_alias)
                self.ready.set()
                code = await proc.wait()
                return describe_exit(code)
            if proc.returncode is None:
                self._signal_group(proc, signal.SIGKILL)
                await proc.wait()
                return f"was not healthy within {self.settings.startup_timeout:.0f}s"
            return f"{describe_exit(proc.returncode)} during start-up"
        finally:
            self.ready.clear()
            await asyncio.wait([pump], timeout=1.0)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process, started: float) -> bool:
        """Poll /health until 200; False if the child exits or the deadline passes."""
        deadline = started + self.settings.startup_timeout
        url = f"{self.backend.base_url}/health"
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                async with self.client.get(url, timeout=ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return True
            except (ClientError, TimeoutError):
                pass
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), HEALTH_POLL)
            except TimeoutError:
                pass
        return False

    # -- helpers ---------------------------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        s = self.settings
        return [
            str(s.llama_server), "--model", str(s.model), "--alias", str(s.model_alias),
            "--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(self._key_file),
            "--parallel", str(s.parallel), "--metrics", "--no-webui", *s.llama_args,
        ]

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Forward the child's output into our log, keeping the last lines for crash reports."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                child_log.info("%s", line)

    def _attach_log_file(self) -> None:
        """Keep the child's output in <data_dir>/logs/llama-server.log (rotated)."""
        logs = self.settings.data_dir / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        if any(isinstance(h, logging.FileHandler) for h in child_log.handlers):
            return
        handler = logging.handlers.RotatingFileHandler(
            logs / "llama-server.log", maxBytes=LOG_FILE_BYTES, backupCount=2)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.setLevel(logging.DEBUG)
        handler.addFilter(RedactingFilter())
        child_log.addHandler(handler)
        child_log.setLevel(logging.DEBUG)
        os.chmod(logs / "llama-server.log", 0o600)

    @staticmethod
    def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
