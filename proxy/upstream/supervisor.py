"""llama-server as a supervised child (proxy/runtime/child.py does the supervising).

Each catalog model that runs here is one child, in its own process group on a free loopback port,
protected by a random API key kept in an owner-only file (--api-key-file, so it is not in the
process list), with its output in our log and in <data_dir>/logs/llama-server.log (each line
after the first model's prefixed with its id). Its phases are its Backend's states; when it
starts and stops is the catalog's decision (proxy/upstream/catalog.py).
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
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
        return await self.child.start(wait=wait)

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after child_stop_grace."""
        await self.child.stop()

    def _command(self) -> list[str]:
        e = self.entry
        sized = ["--ctx-size", str(e.ctx_size)] if e.ctx_size else []
        return [
            str(self.settings.llama_server), "--model", str(e.gguf), "--alias", e.id,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--api-key-file", str(self._key_file), "--parallel", str(e.parallel), "--metrics",
            "--no-webui", "--cache-ram", str(e.cache_ram), *sized, *(e.llama_args or ()),
        ]

    async def _healthy(self) -> bool:
        try:
            async with self.client.get(f"{self.backend.base_url}/health",
                                       timeout=ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (ClientError, TimeoutError):
            return False

    def _log_line(self, line: str) -> None:
        child_log.info("%s%s", self._prefix, line)


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
