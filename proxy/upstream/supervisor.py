"""llama-server as a supervised child (proxy/runtime/child.py does the supervising).

Each catalog model that runs here is one child, in its own process group on a free loopback port,
protected by a random API key kept in an owner-only file (--api-key-file, so it is not in the
process list), with its output in our log and in <data_dir>/logs/llama-server.log (each line
after the first model's prefixed with its id). Its phases are its Backend's states; when it
starts and stops is the catalog's decision (proxy/upstream/catalog.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import logging.handlers
import os
import re
import secrets
import socket
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout

from config import ConfigError, Settings
from config.catalog import ModelEntry
from proxy.observe.logs import RedactingFilter, add_threaded_handler, register_secret
from proxy.runtime.child import ChildProcess, Restart
from proxy.state.files import hold_lock, release_lock, write_private
from proxy.upstream.backends import Backend, State

log = logging.getLogger("proxy.supervisor")
child_log = logging.getLogger("llama-server")

LOG_FILE_BYTES = 10 * 1024 * 1024


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaSupervisor:
    """One catalog model's llama-server child. The data dir's lock is the catalog's to hold."""

    def __init__(self, settings: Settings, entry: ModelEntry, index: int,
                 client: ClientSession, backend: Backend) -> None:
        self.settings = settings
        self.entry = entry
        self.client = client
        self.backend = backend
        # The first model keeps the file name a single-model appliance always had.
        name = "llama-server.key" if index == 0 else f"llama-server-{index}.key"
        self._key_file = settings.data_dir / name
        self._prefix = f"[{entry.id}] " if index else ""
        # Where its slots are saved: its own settings' directory, so a changed model never
        # restores another's cache.
        self.slots_dir = slot_dir(settings.data_dir, entry) if settings.slot_save else None
        # One port for the child's whole life: worker processes reach it there across restarts.
        self.port = free_loopback_port()
        backend.base_url = f"http://127.0.0.1:{self.port}"
        backend.api_key = secrets.token_urlsafe(32)
        register_secret(backend.api_key)
        self.child = ChildProcess(
            "llama-server", self._command, probe=self._healthy,
            ready_within=float(entry.startup_timeout or settings.startup_timeout),
            restart=Restart(first_delay=1.0, max_delay=30.0,
                            give_up_after=settings.restart_limit, window=settings.restart_window),
            stop_grace=settings.child_stop_grace, on_line=self._log_line,
            on_phase=lambda phase, why: backend.set_state(State(phase.value), why),
            starting="loading model", logger=log,
            detail=f"on 127.0.0.1:{self.port} (model {entry.id})")

    @property
    def ready(self) -> asyncio.Event:
        return self.child.ready

    async def start(self, wait: bool = False) -> bool:
        """wait: until it is ready (True) or its first start failed (False, not retried)."""
        write_private(self._key_file, self.backend.api_key + "\n")
        attach_log_file(self.settings.data_dir)
        if self.slots_dir is not None:  # llama-server wants it there
            self.slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return await self.child.start(wait=wait)

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after child_stop_grace."""
        await self.child.stop()

    def _command(self) -> list[str]:
        e = self.entry
        sized = ["--ctx-size", str(e.ctx_size)] if e.ctx_size else []
        if self.slots_dir is not None:
            sized += ["--slot-save-path", str(self.slots_dir)]
        return [
            str(self.settings.llama_server), "--model", str(e.gguf), "--alias", e.id,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--api-key-file", str(self._key_file), "--parallel", str(e.parallel), "--metrics",
            "--no-webui", "--cache-ram", str(e.cache_ram), *sized, *(e.llama_args or ()),
        ]

    async def save_slots(self) -> int:
        """Each idle slot's KV cache to its file, before the child stops: the tokens saved.
        A slot still generating (a restart while requests run) is left: a save would wait
        for its answer to end."""
        if self.slots_dir is None:
            return 0
        self.slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        saved = sum([await self._slot(n, "save", "n_saved") for n in await self._idle_slots()])
        prune_slots(self.settings.data_dir / SLOTS, self.settings.slot_save_mib)
        return saved

    async def restore_slots(self) -> int:
        """The saved slots back into a child that just started: the tokens restored."""
        if self.slots_dir is None or not self.slots_dir.is_dir():
            return 0
        return sum([await self._slot(n, "restore", "n_restored") for n in range(self._slots())
                    if (self.slots_dir / SLOT_FILE.format(n=n)).is_file()])

    def _slots(self) -> int:
        return int(self.entry.parallel or 1)

    async def _idle_slots(self) -> list[int]:
        """The slots not generating now, from its /slots (none when it cannot say)."""
        try:
            async with self.client.get(f"{self.backend.base_url}/slots",
                                       headers=self.backend.auth_headers(),
                                       timeout=ClientTimeout(total=5)) as resp:
                slots = await resp.json(content_type=None) if resp.status == 200 else []
        except (ClientError, TimeoutError, ValueError):
            return []
        return [int(s["id"]) for s in slots if isinstance(s, dict) and isinstance(
            s.get("id"), int) and not s.get("is_processing")] if isinstance(slots, list) else []

    async def _slot(self, n: int, action: str, counted: str) -> int:
        """One slot saved or restored; 0 (logged) when the child cannot (an empty slot, a
        file from an older build): a cache, never a reason to fail."""
        try:
            async with self.client.post(
                    f"{self.backend.base_url}/slots/{n}?action={action}",
                    json={"filename": SLOT_FILE.format(n=n)},
                    headers=self.backend.auth_headers(),
                    timeout=ClientTimeout(total=SLOT_TIMEOUT)) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else {}
                if resp.status != 200:
                    log.info("model %s: slot %d not %sd (%s)", self.entry.id, n, action,
                             resp.status)
        except (ClientError, TimeoutError, ValueError) as exc:
            log.info("model %s: slot %d not %sd (%s)", self.entry.id, n, action,
                     type(exc).__name__)
            return 0
        count = body.get(counted) if isinstance(body, dict) else None
        return count if isinstance(count, int) else 0

    async def _healthy(self) -> bool:
        try:
            async with self.client.get(f"{self.backend.base_url}/health",
                                       timeout=ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (ClientError, TimeoutError):
            return False

    def _log_line(self, line: str) -> None:
        child_log.info("%s%s", self._prefix, line)


SLOTS = "slots"
SLOT_FILE = "slot-{n}.bin"
SLOT_TIMEOUT = 30.0


def slot_dir(data_dir: Path, entry: ModelEntry) -> Path:
    """<data_dir>/slots/<id>-<digest of what shapes its KV cache>: the model file (path, size,
    time), its context, slots and arguments."""
    gguf = Path(str(entry.gguf))
    try:
        stat = gguf.stat()
        file = [str(gguf), stat.st_size, stat.st_mtime_ns]
    except OSError:
        file = [str(gguf)]
    shape = [file, entry.ctx_size, entry.parallel, list(entry.llama_args or ())]
    digest = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", entry.id)[:64]
    return data_dir / SLOTS / f"{name}-{digest}"


def prune_slots(root: Path, limit_mib: int) -> None:
    """Saved slots within limit_mib on disk, the oldest removed first."""
    files = sorted((p for p in root.glob("*/*.bin") if p.is_file()),
                   key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    while files and total > limit_mib * 1024 * 1024:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)


def hold_data_dir(data_dir: Path) -> int:
    """The data dir's lock: its key files and logs are one appliance's."""
    lock = hold_lock(data_dir / "llama-server.lock")
    if lock is None:
        raise ConfigError("data_dir", f"another appliance is already running with "
                          f"{data_dir}; give this one its own --data-dir")
    return lock


def release_data_dir(lock: int | None) -> None:
    release_lock(lock)


def attach_log_file(data_dir: Path) -> None:
    """Keep the children's output in <data_dir>/logs/llama-server.log (rotated)."""
    logs = data_dir / "logs"
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
