"""Shared fixtures: one real llama-server per session, the fake upstream, in-process appliances."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from hypothesis import settings as hypothesis_settings

from config import Settings, load_settings
from config.paths import bundled_llama_server, bundled_model
from proxy.server import Running, start
from tests.kit import fake_upstream
from tests.kit.helpers import free_port, http_status, wait_until

# Property tests explore the same examples on every run (a failure is found the same way on any
# machine), without per-example deadlines that a busy CI machine would trip.
hypothesis_settings.register_profile("appliance", derandomize=True, deadline=None,
                                     database=None)
hypothesis_settings.load_profile("appliance")

# The connection layer's tests run on uvloop, the loop the appliance ships with (its transports
# report a client's end of stream their own way); the rest on asyncio's.
ON_UVLOOP = ("test_edge.py", "test_disconnect.py")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in ON_UVLOOP:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


MODEL_ID = "smollm2"
ADMIN_KEY = "test-admin-key-0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
NO_LIMITS = {"limit_rpm": 0, "limit_tpm": 0, "limit_concurrency": 0, "limit_ip_rpm": 0}


@dataclass
class Llama:
    url: str
    key: str
    model: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    """The real llama-server with the bundled model, started once for the whole session."""
    binary, model = bundled_llama_server(), bundled_model()
    assert binary and model, "run `make install` first: llama-server or the model is missing"
    port, key = free_port(), secrets.token_urlsafe(16)
    log = (tmp_path_factory.mktemp("llama") / "llama-server.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "--model", str(model), "--alias", MODEL_ID, "--host", "127.0.0.1",
         "--port", str(port), "--api-key", key, "--parallel", "2", "--ctx-size", "4096",
         "--metrics", "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(f"{url}/health") == 200, 60, "llama-server to load")
        yield Llama(url, key, MODEL_ID, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a UNIX socket for the whole session."""
    work = tmp_path_factory.mktemp("redis")
    sock = work / "redis.sock"
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(work),
         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "redis-server to start")
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


def redis_answers(url: str) -> bool:
    """Serving data, not only up: PING is answered while the data is still loading."""
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client.dbsize()
        return True
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class KillableRedis:
    """A redis-server of the test's own, to kill and restart mid-test. Every write is on disk
    before it is acknowledged (appendfsync always; with everysec, Redis may postpone writing
    by up to two seconds), so what a test wrote before the kill is there after the restart."""

    def __init__(self, work: Path) -> None:
        self.sock = work / "own-redis.sock"
        self.url = f"unix://{self.sock}"
        self._cmd = ["redis-server", "--port", "0", "--unixsocket", str(self.sock), "--dir",
                     str(work), "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self._procs: list[subprocess.Popen[bytes]] = []
        self.restart()

    def kill(self) -> None:
        self._procs[-1].kill()
        self._procs[-1].wait()

    def restart(self) -> None:
        # A killed Redis leaves its socket file behind: wait for an answer, not for the file.
        self._procs.append(subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL))
        wait_until(lambda: redis_answers(self.url), 10, "redis-server to answer")

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[KillableRedis]:
    server = KillableRedis(tmp_path)
    yield server
    server.stop()


@dataclass
class Fake:
    url: str
    record: fake_upstream.Record
    runner: web.AppRunner


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    app = fake_upstream.make_app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Fake(f"http://127.0.0.1:{port}", app[fake_upstream.RECORD], runner)
    await runner.cleanup()


ProxyFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_proxy(tmp_path: Path, redis_url: str) -> AsyncIterator[ProxyFactory]:
    """Start in-process appliances exactly as `serve` does; stopped at teardown.

    Auth is on unless a test says otherwise, as it is for users; rate limits are off unless a
    test sets the ones it is about.
    """
    started: list[Running] = []

    async def make(**overrides: Any) -> Running:
        # redis_timeout: on a loaded test machine a slow reply must not become a 503 (the
        # shipped 0.25 s is for a server with Redis beside it and nothing else to do).
        values: dict[str, Any] = {"port": 0, "data_dir": str(tmp_path / "data"),
                                  "redis_url": redis_url, "admin_key": ADMIN_KEY,
                                  "redis_timeout": 2.0, **NO_LIMITS}
        values.update(overrides)
        settings: Settings = load_settings(values, env={})
        running = await start(settings)
        started.append(running)
        return running

    yield make
    for running in reversed(started):
        await running.runner.cleanup()


@pytest.fixture
async def fake_proxy(make_proxy: ProxyFactory, fake: Fake) -> Running:
    """For relay mechanics: auth explicitly disabled, fronting the fake upstream."""
    return await make_proxy(upstreams=[fake.url], auth="disabled")


@pytest.fixture
async def model_proxy(make_proxy: ProxyFactory, llama: Llama) -> Running:
    """The appliance as users run it (auth on), fronting the session's real llama-server."""
    return await make_proxy(upstreams=[llama.url], upstream_api_key=llama.key)


def token_for(proxy: Running, subject: str = "alice", **claims: Any) -> str:
    """A JWT signed the way generate_token.py signs it, for this appliance."""
    from auth.tokens import issue_token

    return issue_token(proxy.settings, subject, 1, **claims)[0]
