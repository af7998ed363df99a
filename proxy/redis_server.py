"""Redis, the store for keys, revocations and limits.

With no redis_url the appliance runs its own redis-server on a UNIX socket in the data dir, with
append-only persistence, so keys survive restarts. If that socket already answers (the appliance
is running while generate_token.py is used), it is shared rather than started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import time

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from config import ConfigError, Settings
from proxy.supervisor import die_with_parent

log = logging.getLogger("proxy.redis")
SOCKET = "redis.sock"
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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.socket = settings.data_dir / SOCKET
        self.url = f"unix://{self.socket}"
        self.log_file = settings.data_dir / "logs" / "redis.log"
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start redis-server (and keep it running), or share the one already answering."""
        probe = make_client(self.settings, self.url)
        try:
            if self.socket.exists() and await answers(probe):
                log.info("using the running embedded Redis at %s", self.socket)
                return
            await self._spawn(probe)
        finally:
            await probe.aclose()
        self._watcher = asyncio.create_task(self._watch(), name="embedded-redis")

    async def _spawn(self, probe: Redis) -> None:
        binary = shutil.which(self.settings.redis_server)
        if binary is None:
            raise ConfigError("redis_server", f"{self.settings.redis_server} not found "
                              "(run `make install`, or set redis_url)")
        self.socket.unlink(missing_ok=True)
        store = self.settings.data_dir / "redis"
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Its log goes to a file: a pipe nobody reads would fill up and stall Redis one day.
        self._proc = await asyncio.create_subprocess_exec(
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(store), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.log_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        await self._wait_until_up(probe)
        log.info("embedded Redis (pid %d) on %s, data in %s", self._proc.pid, self.socket, store)

    async def _wait_until_up(self, probe: Redis) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline and self._proc.returncode is None:
            if self.socket.exists() and await answers(probe):
                return
            await asyncio.sleep(0.05)
        await self._terminate()
        raise ConfigError("redis_server", f"embedded redis-server did not start "
                          f"({self._last_log_line()})")

    async def _watch(self) -> None:
        """Restart redis-server if it dies; the append-only file brings the data back."""
        while self._proc is not None:
            code = await self._proc.wait()
            log.error("embedded redis-server exited with %d (%s); restarting in %.0fs", code,
                      self._last_log_line(), RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            probe = make_client(self.settings, self.url)
            try:
                await self._spawn(probe)
            except ConfigError as exc:
                log.error("embedded Redis could not be restarted: %s", exc)
                return
            finally:
                await probe.aclose()

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    async def stop(self) -> None:
        """SIGTERM makes redis-server flush its append-only file before exiting."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

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


async def open_store(settings: Settings) -> tuple[Redis, EmbeddedRedis | None]:
    """Connect to the configured Redis (or start the embedded one); one clear line if it fails."""
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings)
        await embedded.start()
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
