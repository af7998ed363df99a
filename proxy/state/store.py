"""Redis, the store for keys, revocations and limits.

With no redis_url the appliance runs its own redis-server on a UNIX socket in the data dir, with
append-only persistence, so keys survive restarts. If that socket already answers (the appliance
is running while generate_token.py is used), it is shared rather than started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from config import ConfigError, Settings
from proxy.runtime.child import ChildProcess, Restart
from proxy.state.files import hold_lock, release_lock

log = logging.getLogger("proxy.redis")
SOCKET = "redis.sock"
LOCK = "redis.lock"
START_DEADLINE = 10.0
RESTART_DELAY = 1.0
STOP_GRACE = 10.0


POOL_SIZE = 64
POOL_WAIT = 1.0  # seconds a call may wait for a free connection under a burst


def make_client(url: str, timeout: float) -> Redis:
    """A client that fails fast when Redis is down and queues briefly when it is only busy.

    The pool blocks instead of raising: redis-py's default pool errors on the 101st concurrent
    call, which a burst of requests would take for an outage. No retries: redis-py's default
    (10, with backoff) would stall requests while Redis is down.
    """
    pool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_WAIT, decode_responses=True,
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


async def answers(client: Redis) -> bool:
    """Serving our data: PING is answered while a restarted Redis still loads its file, so ask
    for a key of ours instead (also allowed where an ACL limits us to our own keys)."""
    try:
        await client.exists("llp:probe")
        return True
    except (RedisError, OSError):
        return False


class EmbeddedRedis:
    """The data dir's redis-server: started by one process, shared by the others.

    Only the process that started it (and holds `redis.lock`) may stop it or remove its socket;
    redis-server inherits the lock, so no second one is ever started on the same files while it
    lives. The owner restarts it if it dies (the append-only file brings the data back). A
    keeper (the appliance) that found it running watches it and takes over if it goes away (say,
    it belonged to a generate_token.py run that has ended); a short-lived user (generate_token.py)
    starts it only for itself when nothing answers.
    """

    def __init__(self, data_dir: Path, binary: str, timeout: float) -> None:
        self.data_dir = data_dir
        self.binary = binary
        self.timeout = timeout
        self.socket = data_dir / SOCKET
        self.url = f"unix://{self.socket}"
        self.log_file = data_dir / "logs" / "redis.log"
        self.child: ChildProcess | None = None
        self._lock: int | None = None  # our flock on redis.lock while we own redis-server
        self._probe: Redis | None = None
        self._keeper: asyncio.Task[None] | None = None

    @property
    def owned(self) -> bool:
        return self._lock is not None

    async def start(self, keep: bool = True) -> None:
        """Share the running redis-server, or start one; keep=True takes over a shared one
        that goes away."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._probe = make_client(self.url, self.timeout)
        try:
            await self._share_or_spawn()
        except BaseException:
            await self._probe.aclose()
            raise
        if keep and not self.owned:
            self._keeper = asyncio.create_task(self._take_over_when_gone(), name="redis-keeper")

    async def _share_or_spawn(self) -> None:
        assert self._probe is not None
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if await answers(self._probe):
                log.info("using the running embedded Redis at %s", self.socket)
                return
            if self._try_lock():
                await self._spawn()
                return
            # Another process owns it and is starting or restarting it: wait, never start twice.
            if time.monotonic() > deadline:
                raise ConfigError("redis_server", f"the embedded Redis in {self.data_dir} "
                                  "belongs to another process but does not answer")
            await asyncio.sleep(0.05)

    def _try_lock(self) -> bool:
        self._lock = hold_lock(self.data_dir / LOCK)
        return self._lock is not None

    def _unlock(self) -> None:
        release_lock(self._lock)  # redis-server's inherited copy is gone once it has exited
        self._lock = None

    async def _spawn(self) -> None:
        assert self._lock is not None and self._probe is not None
        binary = shutil.which(self.binary)
        if binary is None:
            self._unlock()
            raise ConfigError("redis_server", f"{self.binary} not found "
                              "(run `make install`, or set redis_url)")
        self.socket.unlink(missing_ok=True)  # ours to remove: we hold the lock
        store = self.data_dir / "redis"
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = self._probe
        # Its log goes to a file: a pipe nobody reads would fill up and stall Redis one day.
        command = [binary, "--port", "0", "--unixsocket", str(self.socket),
                   "--unixsocketperm", "700", "--dir", str(store), "--appendonly", "yes",
                   "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                   "--loglevel", "warning", "--logfile", str(self.log_file)]
        self.child = ChildProcess("embedded Redis", lambda: command,
                                  probe=lambda: answers(probe), ready_within=START_DEADLINE,
                                  restart=Restart(first_delay=RESTART_DELAY,
                                                  max_delay=RESTART_DELAY),
                                  stop_grace=STOP_GRACE, pass_fds=(self._lock,),
                                  detail=f"on {self.socket}", logger=log,
                                  last_words=lambda: [self._last_log_line()])
        if not await self.child.start(wait=True):
            await self.child.stop()
            self.child = None
            self._unlock()
            raise ConfigError("redis_server", f"embedded redis-server did not start "
                              f"({self._last_log_line()})")
        log.info("embedded Redis keeps its data in %s", store)

    async def _take_over_when_gone(self) -> None:
        assert self._probe is not None
        while not self.owned:
            await asyncio.sleep(RESTART_DELAY)
            if await answers(self._probe) or not self._try_lock():
                continue  # still there, or its owner is restarting it
            try:
                await self._spawn()
            except (ConfigError, OSError) as exc:
                self._unlock()
                log.error("embedded Redis could not be started: %s", exc)

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    async def stop(self) -> None:
        """Stop redis-server if we started it (SIGTERM: it flushes its append-only file first);
        a Redis we only shared is left alone, socket and all."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        if self.child is not None:
            await self.child.stop()
            self.child = None
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            self._unlock()
        if self._probe is not None:
            await self._probe.aclose()
            self._probe = None


async def open_store(url: str | None, data_dir: Path, binary: str, call_timeout: float,
                     keep: bool = True) -> tuple[Redis, EmbeddedRedis | None]:
    """Connect to Redis at url, or to the data dir's embedded one; one clear line if it fails.

    keep=False is for short-lived tools: they share a running embedded Redis and start one only
    for themselves, and never watch it.
    """
    embedded = None
    if not url:
        embedded = EmbeddedRedis(data_dir, binary, call_timeout)
        await embedded.start(keep)
        url = embedded.url
    client = make_client(url, call_timeout)
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


@contextlib.asynccontextmanager
async def store_for_a_tool(settings: Settings) -> AsyncIterator[Redis]:
    """The appliance's store for a short-lived tool (generate_token.py): the running embedded
    Redis shared, or one started just for the tool, never left behind."""
    redis, embedded = await open_store(settings.redis_url, settings.data_dir,
                                       settings.redis_server, settings.redis_timeout, keep=False)
    try:
        yield redis
    finally:
        await redis.aclose()
        if embedded is not None:
            await embedded.stop()


REDIS = web.AppKey("redis", Redis)


def setup_store(app: web.Application, *, url: str | None, data_dir: Path, binary: str,
                timeout: float) -> None:
    """The Redis client (app[REDIS]) for keys, revocations and limits; call before the
    features that use it (their cleanup then runs before it closes)."""
    app.cleanup_ctx.append(functools.partial(_store, url, data_dir, binary, timeout))


async def _store(url: str | None, data_dir: Path, binary: str, call_timeout: float,
                 app: web.Application) -> AsyncIterator[None]:
    redis, embedded = await open_store(url, data_dir, binary, call_timeout)
    app[REDIS] = redis
    try:
        yield
    finally:
        await redis.aclose()
        if embedded is not None:
            await embedded.stop()
