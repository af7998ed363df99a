"""One supervised child program: llama-server, the embedded Redis, a --workers process.

Explicit phases (starting, ready, failed, stopped); a readiness probe with a deadline; a restart
policy with exponential backoff and a give-up; stop by SIGTERM, then SIGKILL after a grace; and,
when its output is read, a pump that never stops draining the pipe (a child blocked on a full
pipe would never exit). Every child gets PR_SET_PDEATHSIG from util-linux's setpriv as it
starts, so it dies with the appliance even if the appliance is SIGKILLed; a preexec_fn would do
the same but is not safe once the process has threads (the log writers are threads).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("proxy.child")

TAIL_LINES = 30
LOG_LINE_MAX = 8192  # longer output lines are logged truncated (the pipe is drained regardless)
READ_CHUNK = 65536
PROBE_EVERY = 0.1


class Phase(StrEnum):
    STARTING = "starting"  # started, not ready yet, or waiting to restart after a crash
    READY = "ready"
    FAILED = "failed"  # gave up restarting; needs an operator
    STOPPED = "stopped"


@dataclass(frozen=True)
class Restart:
    """After a crash: wait first_delay, doubling up to max_delay; give up after give_up_after
    crashes within window seconds (None: never)."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    give_up_after: int | None = None
    window: float = 300.0

    def delay(self, crashes: int) -> float:
        return min(self.first_delay * 2 ** (crashes - 1), self.max_delay)


class ChildProcess:
    def __init__(self, name: str, command: Callable[[], Sequence[str]], *,
                 probe: Callable[[], Awaitable[bool]] | None = None, ready_within: float = 10.0,
                 restart: Restart | None = None, stop_grace: float = 10.0,
                 on_line: Callable[[str], None] | None = None, inherit_output: bool = False,
                 own_group: bool = True, pass_fds: Sequence[int] = (),
                 on_phase: Callable[[Phase, str | None], None] = lambda phase, why: None,
                 starting: str = "starting", detail: str = "",
                 last_words: Callable[[], list[str]] | None = None,
                 logger: logging.Logger = log) -> None:
        """probe: answers True once the child serves (None: ready once started).
        on_line: each line it prints (read from a pipe); else its output is inherited
        (inherit_output) or discarded. own_group: its own process group, signalled whole.
        starting: the reason shown while it starts; detail: added to its log lines;
        last_words: its last output lines when they are not read here (a log file of its own).
        """
        self.name = name
        self.command = command
        self.probe = probe
        self.ready_within = ready_within
        self.restart = restart
        self.stop_grace = stop_grace
        self.on_line = on_line
        self.inherit_output = inherit_output
        self.own_group = own_group
        self.pass_fds = tuple(pass_fds)
        self.on_phase = on_phase
        self.starting = starting
        self.detail = f" {detail}" if detail else ""
        self.last_words = last_words
        self.log = logger
        self.phase = Phase.STOPPED
        self.reason: str | None = None
        self.ready = asyncio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[bool] | None = None
        self._first_awaited = False
        self._stopping = asyncio.Event()
        self._crashes: list[float] = []
        self._settled: list[asyncio.Future[None]] = []
        self.restarts = 0  # restarts after it ended, for the metrics

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, wait: bool = False) -> bool:
        """Start it, and keep it running as the restart policy says. wait=True: until the
        first start is ready (True) or has failed (False; then it is not restarted, the caller
        decides); else True at once."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"{self.name} is already running")
        self._stopping.clear()
        self._first = asyncio.get_running_loop().create_future()
        self._first_awaited = wait
        self._task = asyncio.create_task(self._run(), name=f"child {self.name}")
        return await asyncio.shield(self._first) if wait else True

    def send_signal(self, sig: signal.Signals) -> None:
        """A signal to the running process (none when it is not running)."""
        self._signal(sig)

    def terminate(self) -> None:
        """SIGTERM now, without waiting, and no restart (stop() waits, and escalates)."""
        self._stopping.set()
        self._signal(signal.SIGTERM)

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after stop_grace; no restart afterwards."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self.log.info("stopping %s (pid %d)", self.name, proc.pid)
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace)
            except TimeoutError:
                self.log.warning("%s ignored SIGTERM for %.0fs; killing it", self.name,
                                 self.stop_grace)
                self._signal(signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._settle_first(False)
        self._set(Phase.STOPPED)

    # -- the run loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._keep_running()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave the child "starting" for ever
            self.log.exception("supervising %s failed", self.name)
            self._set(Phase.FAILED, "its supervision failed (see the log)")
        finally:
            self._settle_first(False)

    async def _keep_running(self) -> None:
        while True:
            why = await self._run_once()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            policy = None if self._first_start_failed() else self.restart
            window = policy.window if policy else 0.0
            self._crashes = [t for t in self._crashes if now - t < window] + [now]
            output = self._last_output()
            if policy is None or (policy.give_up_after is not None
                                  and len(self._crashes) >= policy.give_up_after):
                if policy is not None:
                    why = f"{why}; gave up after {len(self._crashes)} crashes in {window:.0f}s"
                self._set(Phase.FAILED, why)
                self.log.error("%s %s.%s", self.name, why, output)
                return
            self._settle_first(False)  # a first start that failed: the restarts go on
            delay = policy.delay(len(self._crashes))
            self.restarts += 1
            self._set(Phase.STARTING, f"{why}; restarting in {delay:.0f}s")
            self.log.error("%s %s; restarting in %.0fs.%s", self.name, why, delay, output)
            with contextlib.suppress(TimeoutError):  # stop() or terminate() ends the wait
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return

    def _first_start_failed(self) -> bool:
        """A start someone waits for is not retried: they hear it failed, and decide."""
        return self._first_awaited and self._first is not None and not self._first.done()

    def _last_output(self) -> str:
        lines = list(self.tail) if self.on_line is not None else (
            self.last_words() if self.last_words is not None else [])
        last = "\n".join(f"    {line}" for line in lines)
        return f" Last output:\n{last}" if last else ""

    async def _run_once(self) -> str:
        """Start the child once, wait until it is ready, then until it exits; say why it ended."""
        self._set(Phase.STARTING, self.starting)
        self.tail.clear()  # the last lines are this run's, for its crash report
        started = time.monotonic()
        try:
            proc = await self._spawn()
        except OSError as exc:
            return f"could not be started ({exc.strerror or exc})"
        self._proc = proc
        if self._stopping.is_set():  # stopped while it was being started
            self._signal(signal.SIGTERM)
        self.log.info("started %s (pid %d)%s", self.name, proc.pid, self.detail)
        pump = asyncio.create_task(self._pump(proc)) if self.on_line is not None else None
        try:
            if await self._until_ready(proc, started):
                self._set(Phase.READY)
                self.log.info("%s ready in %.2fs%s", self.name, time.monotonic() - started,
                              self.detail)
                self.ready.set()
                self._settle_first(True)
                return describe_exit(await proc.wait())
            if proc.returncode is None:
                self._signal(signal.SIGKILL)
                await proc.wait()
                return f"was not healthy within {self.ready_within:.0f}s"
            return f"{describe_exit(proc.returncode)} during start-up"
        finally:
            self.ready.clear()
            if pump is not None:
                await asyncio.wait([pump], timeout=1.0)

    async def _spawn(self) -> asyncio.subprocess.Process:
        output = (asyncio.subprocess.PIPE if self.on_line is not None
                  else None if self.inherit_output else asyncio.subprocess.DEVNULL)
        return await asyncio.create_subprocess_exec(
            *with_parent_death_signal(list(self.command())),
            stdin=asyncio.subprocess.DEVNULL, stdout=output,
            stderr=asyncio.subprocess.STDOUT if self.on_line is not None else output,
            start_new_session=self.own_group, pass_fds=self.pass_fds)

    async def _until_ready(self, proc: asyncio.subprocess.Process, started: float) -> bool:
        """Probe until it answers; False if the child exits or the deadline passes first."""
        if self.probe is None:
            return True
        deadline = started + self.ready_within
        while time.monotonic() < deadline and proc.returncode is None:
            if await self.probe():
                return True
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), PROBE_EVERY)
            except TimeoutError:
                pass
        return False

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each output line to on_line (the last ones are kept for crash reports)."""
        assert proc.stdout is not None and self.on_line is not None
        lines = LineSplitter()
        while chunk := await proc.stdout.read(READ_CHUNK):
            self._lines(lines.feed(chunk))
        self._lines(lines.rest())

    def _lines(self, lines: list[bytes]) -> None:
        assert self.on_line is not None
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                self.on_line(line)

    async def settled(self) -> Phase:
        """Until it is ready, or has failed or stopped (at once if it already is)."""
        while self.phase is Phase.STARTING:
            waiter = asyncio.get_running_loop().create_future()
            self._settled.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._settled:
                    self._settled.remove(waiter)
        return self.phase

    def _set(self, phase: Phase, reason: str | None = None) -> None:
        self.phase, self.reason = phase, reason
        self.on_phase(phase, reason)
        if phase is not Phase.STARTING:
            waiters, self._settled = self._settled, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _settle_first(self, ready: bool) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(ready)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            if self.own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


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
