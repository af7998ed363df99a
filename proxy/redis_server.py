"""Redis, the store for keys, revocations and limits.

With no redis_url the appliance runs its own redis-server on a UNIX socket in the data dir, with
append-only persistence, so keys survive restarts. If that socket already answers (the appliance
is running while generate_token.py is used), it is shared rather than started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from config import ConfigError, Settings
from proxy.supervisor import hold_lock, with_parent_death_signal

log = logging.getLogger("proxy.redis")
SOCKET = "redis.sock"
LOCK = "redis.lock"
START_DEADLINE = 10.0
RESTART_DELAY = 1.0


POOL_SIZE = 64
POOL_WAIT = 1.0  # seconds a call may wait for a free connection under a burst


def make_client(settings: Settings, url: str) -> Redis:
    """A client that fails fast when Redis is down and queues briefly when it is only busy.

    The pool blocks instead of raising: redis-py's default pool errors on the 101st concurrent
    call, which a burst of requests would take for an outage. No retries: redis-py's default
    (10, with backoff) would stall requests while Redis is down.
    """
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_WAIT, decode_responses=True,
        socket_timeout=settings.redis_timeout, socket_connect_timeout=settings.redis_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


async def answers(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


class EmbeddedRedis:
    """The data dir's redis-server: started by one process, shared by the others.

    Only the process that started it (and holds `redis.lock`) may stop it or remove its socket;
    redis-server inherits the lock, so no second one is ever started on the same files while it
    lives. A keeper (the appliance) that found it running watches it and takes over if it goes
    away (say, it belonged to a generate_token.py run that has ended); a short-lived user
    (generate_token.py) starts it only for itself when nothing answers.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.socket = settings.data_dir / SOCKET
        self.url = f"unix://{self.socket}"
        self.log_file = settings.data_dir / "logs" / "redis.log"
        self._lock_path = settings.data_dir / LOCK
        self._lock: int | None = None  # our flock on redis.lock while we own redis-server
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def owned(self) -> bool:
        return self._lock is not None

    async def start(self, keep: bool = True) -> None:
        """Share the running redis-server, or start one; keep=True watches it from then on."""
        self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = make_client(self.settings, self.url)
        try:
            await self._share_or_spawn(probe)
        finally:
            await probe.aclose()
        if keep:
            self._watcher = asyncio.create_task(self._keep(), name="embedded-redis")

    async def _share_or_spawn(self, probe: Redis) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if await answers(probe):
                log.info("using the running embedded Redis at %s", self.socket)
                return
            if self._try_lock():
                await self._spawn(probe)
                return
            # Another process owns it and is starting or restarting it: wait, never start twice.
            if time.monotonic() > deadline:
                raise ConfigError("redis_server", f"the embedded Redis in {self.socket.parent} "
                                  "belongs to another process but does not answer")
            await asyncio.sleep(0.05)

    def _try_lock(self) -> bool:
        self._lock = hold_lock(self._lock_path)
        return self._lock is not None

    def _unlock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)  # redis-server's inherited copy is gone once it has exited

    async def _spawn(self, probe: Redis) -> None:
        binary = shutil.which(self.settings.redis_server)
        if binary is None:
            self._unlock()
            raise ConfigError("redis_server", f"{self.settings.redis_server} not found "
                              "(run `make install`, or set redis_url)")
        self.socket.unlink(missing_ok=True)  # ours to remove: we hold the lock
        store = self.settings.data_dir / "redis"
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        assert self._lock is not None
        # Its log goes to a file: a pipe nobody reads would fill up and stall Redis one day.
        self._proc = await asyncio.create_subprocess_exec(
            *with_parent_death_signal([
                binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm",
                "700", "--dir", str(store), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.log_file)]),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, pass_fds=(self._lock,),
        )
        await self._wait_until_up(probe)
        log.info("embedded Redis (pid %d) on %s, data in %s", self._proc.pid, self.socket, store)

    async def _wait_until_up(self, probe: Redis) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline and self._proc.returncode is None:
            if await answers(probe):
                return
            await asyncio.sleep(0.05)
        await self._terminate()
        self._unlock()
        raise ConfigError("redis_server", f"embedded redis-server did not start "
                          f"({self._last_log_line()})")

    async def _keep(self) -> None:
        """Restart our redis-server if it dies (the append-only file brings the data back);
        take over one we only shared once it stops answering."""
        probe = make_client(self.settings, self.url)
        try:
            while True:
                if self._proc is not None:
                    code = await self._proc.wait()
                    log.error("embedded redis-server exited with %d (%s); restarting in %.0fs",
                              code, self._last_log_line(), RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)
                if self._proc is None and await answers(probe):
                    continue  # still shared and healthy
                try:
                    if self.owned or self._try_lock():
                        await self._spawn(probe)
                except (ConfigError, OSError) as exc:
                    self._proc = None
                    self._unlock()  # let whoever can start it try
                    log.error("embedded Redis could not be restarted: %s", exc)
        finally:
            await probe.aclose()

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    async def stop(self) -> None:
        """Stop redis-server if we started it (SIGTERM: it flushes its append-only file first);
        a Redis we only shared is left alone, socket and all."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if not self.owned:
            return
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._unlock()

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def open_store(settings: Settings, keep: bool = True
                     ) -> tuple[Redis, EmbeddedRedis | None]:
    """Connect to the configured Redis (or the embedded one); one clear line if it fails.

    keep=False is for short-lived tools: they share a running embedded Redis and start one only
    for themselves, and never watch it.
    """
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings)
        await embedded.start(keep)
        url = embedded.url
    client = make_client(settings, url)
    if not await answers(client):
        await client.aclose()
        if embedded:
            await embedded.stop()
        raise ConfigError("redis_url", f"Redis at {_host_of(url)} is unreachable")
    return client, embedded


def _host_of(url: str) -> str:
    """Where Redis is, without a password that may be in the URL."""
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1]
