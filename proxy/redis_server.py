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
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start redis-server, or share the one already answering on our socket."""
        probe = make_client(self.settings, self.url)
        try:
            if self.socket.exists() and await answers(probe):
                log.info("using the running embedded Redis at %s", self.socket)
                return
            binary = shutil.which(self.settings.redis_server)
            if binary is None:
                raise ConfigError("redis_server", f"{self.settings.redis_server} not found "
                                  "(run `make install`, or set redis_url)")
            self.socket.unlink(missing_ok=True)
            store = self.settings.data_dir / "redis"
            store.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._proc = await asyncio.create_subprocess_exec(
                binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(store), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--loglevel", "warning",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )
            await self._wait_until_up(probe)
            log.info("embedded Redis (pid %d) on %s, data in %s", self._proc.pid, self.socket,
                     store)
        finally:
            await probe.aclose()

    async def _wait_until_up(self, probe: Redis) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                break
            if self.socket.exists() and await answers(probe):
                return
            await asyncio.sleep(0.05)
        output = b""
        if self._proc.returncode is not None and self._proc.stdout is not None:
            output = await self._proc.stdout.read()
        await self.stop()
        last = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError("redis_server", f"embedded redis-server did not start ({last[0]})")

    async def stop(self) -> None:
        """SIGTERM makes redis-server flush its append-only file before exiting."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()



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
