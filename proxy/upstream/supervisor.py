"""llama-server as a supervised child (proxy/runtime/child.py does the supervising).

It runs in its own process group on a free loopback port, protected by a random API key kept in
an owner-only file (--api-key-file, so it is not in the process list), with its output in our
log and in <data_dir>/logs/llama-server.log. Its phases are its Backend's states: requests get
503 while it loads or restarts, and /health says why it failed.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import secrets
import socket

from aiohttp import ClientError, ClientSession, ClientTimeout

from config import ConfigError, Settings
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
    def __init__(self, settings: Settings, client: ClientSession, backend: Backend) -> None:
        self.settings = settings
        self.client = client
        self.backend = backend
        self._key_file = settings.data_dir / "llama-server.key"
        self._lock: int | None = None
        # One port for the child's whole life: worker processes reach it there across restarts.
        self.port = free_loopback_port()
        backend.base_url = f"http://127.0.0.1:{self.port}"
        backend.api_key = secrets.token_urlsafe(32)
        register_secret(backend.api_key)
        self.child = ChildProcess(
            "llama-server", self._command, probe=self._healthy,
            ready_within=settings.startup_timeout,
            restart=Restart(first_delay=1.0, max_delay=30.0,
                            give_up_after=settings.restart_limit, window=settings.restart_window),
            stop_grace=settings.child_stop_grace, on_line=self._log_line,
            on_phase=lambda phase, why: backend.set_state(State(phase.value), why),
            starting="loading model", logger=log,
            detail=f"on 127.0.0.1:{self.port} (model {settings.model_alias})")

    @property
    def ready(self) -> asyncio.Event:
        return self.child.ready

    async def start(self) -> None:
        self._lock = hold_lock(self.settings.data_dir / "llama-server.lock")
        if self._lock is None:  # its key file and log are this data dir's: one appliance each
            raise ConfigError("data_dir", f"another appliance is already running with "
                              f"{self.settings.data_dir}; give this one its own --data-dir")
        write_private(self._key_file, self.backend.api_key + "\n")
        self._attach_log_file()
        await self.child.start()

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after child_stop_grace."""
        await self.child.stop()
        release_lock(self._lock)
        self._lock = None

    def _command(self) -> list[str]:
        s = self.settings
        return [
            str(s.llama_server), "--model", str(s.model), "--alias", str(s.model_alias),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--api-key-file", str(self._key_file), "--parallel", str(s.parallel), "--metrics",
            "--no-webui", *s.llama_args,
        ]

    async def _healthy(self) -> bool:
        try:
            async with self.client.get(f"{self.backend.base_url}/health",
                                       timeout=ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (ClientError, TimeoutError):
            return False

    @staticmethod
    def _log_line(line: str) -> None:
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
