"""--workers N: extra HTTP worker processes sharing the listening port (SO_REUSEPORT).

The first process keeps everything stateful: the llama-server children, the embedded Redis and
each model's slot queue. Each extra worker is the same appliance fronting those children as
servers, using that Redis and borrowing each model (its start and its slots) from the first
process (proxy/access/shared_slots.py), so credentials, limits, the bound on each model, the
turn-taking and the decision to start or stop a model are all shared. Workers get their settings
from an owner-only file, die with the first process (PR_SET_PDEATHSIG) and are restarted if they
crash.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson

from config import Settings
from proxy.access.shared_slots import SlotLender
from proxy.api.metrics import forget_process
from proxy.runtime.child import ChildProcess, Phase, Restart
from proxy.state.files import write_private
from proxy.state.store import SOCKET
from proxy.upstream.catalog import Catalog

log = logging.getLogger("proxy.workers")
SETTINGS_FILE = "worker-settings-{pid}.json"
SLOTS_SOCKET = "slots-{pid}.sock"  # named after the first process: two appliances never collide
RESTART_DELAY = 1.0


def worker_settings(settings: Settings, port: int, catalog: Catalog) -> dict[str, Any]:
    """The settings of one extra worker: this appliance, minus the parts only one may run.
    Each model run here is, to a worker, a server at its child's address (it asks this process
    for it first, which starts it if it must); a pool of --upstream servers alone stays one."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    models: dict[str, Any] = {}
    for model in catalog.models:
        if not model.entry.id:  # --upstream servers that name their own models
            continue
        child = model.child
        urls = [b.base_url for b in model.backends]
        key = child.api_key if child is not None else model.entry.api_key
        table = {"url": urls, "api_key": key, "aliases": list(model.entry.aliases),
                 "parallel": model.entry.parallel}
        models[model.entry.id] = {k: v for k, v in table.items() if v is not None}
    pool = not catalog.models[0].entry.id  # --upstream servers alone: they stay first
    values.update(
        workers=1, model=None, llama_server=None, models=models,
        upstreams=list(settings.upstreams) if pool else [],
        redis_url=settings.redis_url or f"unix://{settings.data_dir / SOCKET}", port=port,
        health_interval=min(settings.health_interval, 1.0),
        tunnel="none", ngrok_authtoken=None,  # the first process runs the tunnel
    )
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}


def remove_stale_files(data_dir: Path) -> None:
    """Files a killed appliance left behind (named after its pid, which is gone)."""
    for pattern in (SETTINGS_FILE, SLOTS_SOCKET):
        for path in data_dir.glob(pattern.format(pid="*")):
            pid = path.name.split("-")[-1].split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead(worker: ChildProcess, phase: Phase, _why: str | None) -> None:
    """A worker that ended leaves its metrics files: its counters still count, its gauges of
    the moment (open streams) must not."""
    pid = worker.pid
    if phase in (Phase.STARTING, Phase.STOPPED, Phase.FAILED) and pid and not _alive(pid):
        forget_process(pid)


class WorkerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.data_dir / SETTINGS_FILE.format(pid=os.getpid())
        self.children: list[ChildProcess] = []
        self._lender: SlotLender | None = None
        self.port = 0

    async def start(self, port: int, catalog: Catalog,
                    reload: Callable[[], Awaitable[Any]] | None = None) -> None:
        """port: the one we listen on; catalog: the models, lent to the workers; reload: the
        catalog's reload, which a worker may be asked for."""
        remove_stale_files(self.settings.data_dir)
        socket = self.settings.data_dir / SLOTS_SOCKET.format(pid=os.getpid())
        self._lender = SlotLender(catalog, socket, reload)
        await self._lender.start()
        self.port = port
        self._write(catalog)
        command = [sys.executable, "-m", "proxy", "--worker-settings", str(self.path)]
        for index in range(1, self.settings.workers):
            worker = ChildProcess(
                f"worker {index}", lambda: command, inherit_output=True, own_group=False,
                restart=Restart(first_delay=RESTART_DELAY, max_delay=RESTART_DELAY),
                stop_grace=self.settings.shutdown_grace + 10, logger=log)
            worker.on_phase = functools.partial(_forget_dead, worker)
            self.children.append(worker)
            await worker.start()
        log.info("started %d extra worker processes", self.settings.workers - 1)

    def _write(self, catalog: Catalog) -> None:
        assert self._lender is not None
        config = {"settings": worker_settings(self.settings, self.port, catalog),
                  "slots_from": str(self._lender.path)}
        write_private(self.path, orjson.dumps(config).decode())

    def refresh(self, catalog: Catalog) -> None:
        """After a reload: the workers' catalog rewritten, and each worker restarted on it
        (SIGTERM: it drains its own requests; this process serves on the port meanwhile)."""
        self._write(catalog)
        for worker in self.children:
            worker.send_signal(signal.SIGTERM)

    def terminate(self) -> None:
        """SIGTERM every worker: each drains its own requests."""
        for worker in self.children:
            worker.terminate()

    def reload(self) -> None:
        """SIGHUP every worker: each reloads its TLS certificate."""
        for worker in self.children:
            worker.send_signal(signal.SIGHUP)

    async def stopped(self, _app: object = None) -> None:
        """Wait for the workers to exit (SIGKILL past their grace), then stop lending slots."""
        self.terminate()  # all of them at once: their graces run side by side
        for worker in self.children:
            await worker.stop()
        if self._lender is not None:
            await self._lender.close()
        self.path.unlink(missing_ok=True)
