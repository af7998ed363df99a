"""--workers N: extra HTTP worker processes sharing the listening port (SO_REUSEPORT).

The first process keeps everything stateful: the llama-server child and the embedded Redis. Each
extra worker is the same appliance fronting that child as an upstream and using that Redis, so
credentials and limits stay shared. Workers get their settings from an owner-only file, die with
the first process (PR_SET_PDEATHSIG) and are restarted if they crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from config import Settings
from proxy.keys import SUPERVISOR
from proxy.redis_server import EmbeddedRedis
from proxy.supervisor import die_with_parent, write_private

if TYPE_CHECKING:
    from proxy.server import Running

log = logging.getLogger("proxy.workers")
SETTINGS_FILE = "worker-settings.json"
RESTART_DELAY = 1.0


def worker_settings(settings: Settings, running: Running) -> dict[str, Any]:
    """The settings of one extra worker: this appliance, minus the parts only one may run."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    upstreams, key = list(settings.upstreams), settings.upstream_api_key
    supervisor = running.app[SUPERVISOR]
    if supervisor is not None:
        upstreams, key = [supervisor.backend.base_url, *upstreams], supervisor.backend.api_key
    slots = settings.admission_slots
    values.update(
        workers=1, model=None, llama_server=None, upstreams=upstreams, upstream_api_key=key,
        redis_url=settings.redis_url or EmbeddedRedis(settings).url,
        port=int(running.base_url.rsplit(":", 1)[1]),
        # The model's slots are shared out, so all processes together keep the bound.
        admission_slots=math.ceil(slots / settings.workers) if slots > 0 else 0,
        health_interval=min(settings.health_interval, 1.0),
    )
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}


class WorkerPool:
    def __init__(self, settings: Settings, running: Running) -> None:
        self.settings = settings
        self.running = running
        self.path = settings.data_dir / SETTINGS_FILE
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        write_private(self.path, orjson.dumps(worker_settings(self.settings, self.running))
                      .decode())
        for index in range(1, self.settings.workers):
            self._tasks.append(asyncio.create_task(self._keep(index)))
        log.info("started %d extra worker processes", self.settings.workers - 1)

    async def _keep(self, index: int) -> None:
        while not self._stopping:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "--worker-settings", str(self.path),
                stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
            self.procs[index] = proc
            code = await proc.wait()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %d; restarting in %.0fs", index, proc.pid,
                      code, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)

    async def stop(self) -> None:
        """SIGTERM every worker (each drains its own requests), SIGKILL what outlives the grace."""
        self._stopping = True
        live = [p for p in self.procs.values() if p.returncode is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        grace = self.settings.shutdown_grace + 5
        for proc in live:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
