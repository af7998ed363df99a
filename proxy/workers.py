"""--workers N: extra HTTP worker processes sharing the listening port (SO_REUSEPORT).

The first process keeps everything stateful: the llama-server child, the embedded Redis and the
model's slot queue. Each extra worker is the same appliance fronting that child as an upstream,
using that Redis and borrowing slots from that queue (proxy/shared_slots.py), so credentials,
limits, the bound on the model and the turn-taking are all shared. Workers get their settings
from an owner-only file, die with the first process (PR_SET_PDEATHSIG) and are restarted if they
crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from config import Settings
from proxy.admission import FairQueue
from proxy.keys import QUEUE, SUPERVISOR
from proxy.redis_server import EmbeddedRedis
from proxy.shared_slots import SlotLender
from proxy.supervisor import with_parent_death_signal, write_private

if TYPE_CHECKING:
    from proxy.server import Running

log = logging.getLogger("proxy.workers")
SETTINGS_FILE = "worker-settings-{pid}.json"
SLOTS_SOCKET = "slots-{pid}.sock"  # named after the first process: two appliances never collide
RESTART_DELAY = 1.0


def worker_settings(settings: Settings, running: Running) -> dict[str, Any]:
    """The settings of one extra worker: this appliance, minus the parts only one may run."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    upstreams, key = list(settings.upstreams), settings.upstream_api_key
    supervisor = running.app[SUPERVISOR]
    if supervisor is not None:
        upstreams, key = [supervisor.backend.base_url, *upstreams], supervisor.backend.api_key
    values.update(
        workers=1, model=None, llama_server=None, upstreams=upstreams, upstream_api_key=key,
        redis_url=settings.redis_url or EmbeddedRedis(settings).url,
        port=int(running.base_url.rsplit(":", 1)[1]),
        health_interval=min(settings.health_interval, 1.0),
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


class WorkerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.data_dir / SETTINGS_FILE.format(pid=os.getpid())
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lender: SlotLender | None = None
        self._stopping = False

    async def start(self, running: Running) -> None:
        remove_stale_files(self.settings.data_dir)
        slots_from = None
        queue = running.app[QUEUE]
        if isinstance(queue, FairQueue) and queue.slots > 0:
            socket = self.settings.data_dir / SLOTS_SOCKET.format(pid=os.getpid())
            self._lender = SlotLender(queue, socket)
            await self._lender.start()
            slots_from = str(self._lender.path)
        config = {"settings": worker_settings(self.settings, running), "slots_from": slots_from}
        write_private(self.path, orjson.dumps(config).decode())
        for index in range(1, self.settings.workers):
            self._tasks.append(asyncio.create_task(self._keep(index)))
        log.info("started %d extra worker processes", self.settings.workers - 1)

    async def _keep(self, index: int) -> None:
        while not self._stopping:
            proc = await asyncio.create_subprocess_exec(
                *with_parent_death_signal([sys.executable, "-m", "proxy", "--worker-settings",
                                           str(self.path)]),
                stdin=asyncio.subprocess.DEVNULL)
            self.procs[index] = proc
            code = await proc.wait()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %d; restarting in %.0fs", index, proc.pid,
                      code, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)

    def terminate(self) -> None:
        """SIGTERM every worker: each drains its own requests."""
        if self._stopping:
            return
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)

    async def stopped(self, _app: object = None) -> None:
        """Wait for the workers to exit (SIGKILL past their grace), then stop lending slots."""
        self.terminate()
        grace = self.settings.shutdown_grace + 10
        for proc in list(self.procs.values()):
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lender is not None:
            await self._lender.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
