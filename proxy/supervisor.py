"""Supervise llama-server as a child process.

States live on the child's Backend: starting -> ready, and after a crash starting again (with
exponential backoff) until too many crashes in a window turn it failed. The child runs in its own
process group on a free loopback port, protected by a random API key kept in an owner-only file,
and dies with us even if we are SIGKILLed (PR_SET_PDEATHSIG, set by setpriv before it execs: a
preexec_fn is not safe once the process has threads, and the log writers are threads).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import functools
import logging
import logging.handlers
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout

from config import ConfigError, Settings
from proxy.backends import Backend, State
from proxy.logs import RedactingFilter, add_threaded_handler, register_secret

log = logging.getLogger("proxy.supervisor")
child_log = logging.getLogger("llama-server")

BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
HEALTH_POLL = 0.1
TAIL_LINES = 30
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_LINE_MAX = 8192  # longer output lines are logged truncated (the pipe is drained regardless)
READ_CHUNK = 65536


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, if it is there and knows --pdeathsig (2.33 and later)."""
    path = shutil.which("setpriv")
    try:
        usable = path is not None and subprocess.run(
            [path, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=5,
            check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        usable = False
    if not usable:
        log.warning("setpriv --pdeathsig is not available: child processes would outlive an "
                    "appliance killed with SIGKILL (install util-linux 2.33 or later)")
        return None
    return path


def with_parent_death_signal(command: list[str]) -> list[str]:
    """The command, started so that it is SIGKILLed when the appliance dies (even by SIGKILL)."""
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "KILL", "--", *command] if setpriv else command


class LineSplitter:
    """Bytes in, whole lines out; a line over `limit` bytes is cut there and the rest of it
    dropped, so a child that writes one endless line cannot grow our memory or stop the pump."""

    def __init__(self, limit: int = LOG_LINE_MAX) -> None:
        self.limit = limit
        self._partial = b""
        self._skipping = False  # inside an over-long line whose start was already given out

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if self._skipping:
                self._skipping = False
            else:
                out.append(self._cut(line))
        if len(self._partial) > self.limit:
            if not self._skipping:
                out.append(self._cut(self._partial))
            self._partial, self._skipping = b"", True
        return out

    def rest(self) -> list[bytes]:
        partial, self._partial = self._partial, b""
        return [partial] if partial and not self._skipping else []

    def _cut(self, line: bytes) -> bytes:
        if len(line) <= self.limit:
            return line
        return line[: self.limit] + b" ... (line truncated)"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def hold_lock(path: Path) -> int | None:
    """An exclusive flock on path (created owner-only), or None if another process holds it.
    The lock lasts as long as the returned descriptor stays open, in any process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
        self._lock: int | None = None
        # One port for the child's whole life: worker processes reach it there across restarts.
        self.port = free_loopback_port()
        backend.base_url = f"http://127.0.0.1:{self.port}"
        backend.api_key = secrets.token_urlsafe(32)
        register_secret(backend.api_key)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._lock = hold_lock(self.settings.data_dir / "llama-server.lock")
        if self._lock is None:  # its key file and log are this data dir's: one appliance each
            raise ConfigError("data_dir", f"another appliance is already running with "
                              f"{self.settings.data_dir}; give this one its own --data-dir")
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
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

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
            *with_parent_death_signal(self._command(port)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
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
        """Forward the child's output into our log, keeping the last lines for crash reports.

        It never stops draining: a child blocked on a full pipe would never exit.
        """
        assert proc.stdout is not None
        lines = LineSplitter()
        while chunk := await proc.stdout.read(READ_CHUNK):
            self._log_lines(lines.feed(chunk))
        self._log_lines(lines.rest())

    def _log_lines(self, lines: list[bytes]) -> None:
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                child_log.info("%s", line)

    def _attach_log_file(self) -> None:
        """Keep the child's output in <data_dir>/logs/llama-server.log (rotated)."""
        logs = self.settings.data_dir / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        if child_log.handlers:  # one file per process
            return
        path = logs / "llama-server.log"
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        # Opened (delay=True) and written on the log thread: a slow disk never stalls requests.
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_FILE_BYTES, backupCount=2, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.setLevel(logging.DEBUG)
        handler.addFilter(RedactingFilter())
        add_threaded_handler(child_log, handler)
        child_log.setLevel(logging.DEBUG)

    @staticmethod
    def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
