"""`tunnel = "ngrok"`: what a user sees without the token or the package, the tunnel's hook in
`serve()` (with a stand-in agent: ngrok itself cannot be reached from here), and the headers the
agent sends over loopback."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from proxy.runtime.tunnel import forward_target
from tests.conftest import Fake, ProxyFactory
from tests.kit.helpers import REPO, Appliance, free_port, redis_servers_with, wait_until

TOKEN = "2fakeNgrokAuthtoken_0123456789abcdefghij"  # shaped like one; never sent anywhere
PUBLIC = "https://fake-tunnel.ngrok-free.app"
FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


def clean_env(**extra: str) -> dict[str, str]:
    """The user's environment without any appliance or ngrok setting of the machine's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLAMA_PROXY_") and k != "NGROK_AUTHTOKEN"}
    env.update(extra)
    return env


def run_proxy(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy --tunnel ngrok` as a user runs it (the bundled model, embedded Redis)."""
    cmd = [sys.executable, "-m", "proxy", "--tunnel", "ngrok", "--port", str(free_port()),
           "--data-dir", str(tmp / "data"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *wanted: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""  # refused before anything started or was printed
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llama-proxy: configuration error: tunnel: ngrok needs ")
    for text in wanted:
        assert text in lines[0]
    return lines[0]


def test_without_a_token_it_says_where_to_get_one(tmp_path: Path) -> None:
    result = run_proxy(tmp_path, clean_env())
    assert_one_clear_line(result, "NGROK_AUTHTOKEN", "https://dashboard.ngrok.com")
    assert not (tmp_path / "data").exists()  # nothing was started


@pytest.mark.parametrize("variable", ["NGROK_AUTHTOKEN", "LLAMA_PROXY_NGROK_AUTHTOKEN"])
def test_without_the_package_it_says_how_to_install_it(tmp_path: Path, variable: str) -> None:
    if importlib.util.find_spec("ngrok") is not None:
        pytest.skip("the ngrok package is installed here; this is about running without it")
    result = run_proxy(tmp_path, clean_env(**{variable: TOKEN}))
    line = assert_one_clear_line(result, "the ngrok package", "-m pip install ngrok")
    assert sys.executable.endswith(line.rsplit(" -m pip", 1)[0].split(": ")[-1])
    assert TOKEN not in result.stdout + result.stderr


# A stand-in for the ngrok package, put first on the appliance's PYTHONPATH: like the real one
# (ngrok-python's loop_wrap), forward() inside a running event loop returns a Task to await, and
# Listener.close() an awaitable. It notes every call in a file for the test to read.
FAKE_NGROK = '''
import asyncio, json, os

def _note(**entry):
    with open(os.environ["FAKE_NGROK_RECORD"], "a") as fh:
        fh.write(json.dumps(entry) + "\\n")

class Listener:
    def url(self):
        return os.environ["FAKE_NGROK_URL"]

    def close(self):
        async def close():
            _note(call="close")
        return asyncio.get_running_loop().create_task(close())

def forward(addr=None, proto=None, **options):
    token = options.pop("authtoken", None)
    _note(call="forward", addr=addr, options=options,
          token_given=token == os.environ.get("FAKE_NGROK_EXPECT"))
    async def connect():
        if os.environ.get("FAKE_NGROK_REFUSE"):
            raise ValueError("failed to connect session", "authentication failed: The "
                             "authtoken you specified does not look like a proper ngrok "
                             "authtoken.\\nYour authtoken: " + str(token) + "\\n\\n"
                             "Instructions to install your authtoken are on your ngrok "
                             "dashboard:\\nhttps://dashboard.ngrok.com/get-started/"
                             "your-authtoken\\n\\nERR_NGROK_105", "ERR_NGROK_105")
        return Listener()
    return asyncio.get_running_loop().create_task(connect())
'''


def fake_agent(tmp: Path, **extra: str) -> dict[str, str]:
    agent = tmp / "fake-agent"
    agent.mkdir(parents=True)
    (agent / "ngrok.py").write_text(textwrap.dedent(FAKE_NGROK))
    return {"PYTHONPATH": str(agent), "NGROK_AUTHTOKEN": TOKEN, "FAKE_NGROK_EXPECT": TOKEN,
            "FAKE_NGROK_URL": PUBLIC,
            "FAKE_NGROK_RECORD": str(tmp / "record.jsonl"), **extra}


def record(tmp: Path) -> list[dict]:
    path = tmp / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_the_tunnel_opens_after_the_listener_prints_its_url_and_closes_on_shutdown(
    tmp_path: Path,
) -> None:
    # An upstream that is not there: the tunnel's hook needs no model, and so no CPU.
    app = Appliance(tmp_path, "--upstream", f"http://127.0.0.1:{free_port()}", "--tunnel",
                    "ngrok", env=fake_agent(tmp_path))
    try:
        wait_until(lambda: "credentials: " in app.log or app.proc.poll() is not None, 30,
                   "the start-up lines")
        assert app.proc.poll() is None, app.log
        log = app.log
        assert f"llama-proxy public URL: {PUBLIC}  (OpenAI base URL: {PUBLIC}/v1)" in log
        assert (f"generate_token.py --data-dir {app.data_dir} NAME --api-key --snippets --qr "
                f"--base-url {PUBLIC}") in log
        assert "ngrok-skip-browser-warning" in log  # the free plan's browser warning
        assert log.index("listening on") < log.index("public URL")
        forward = record(tmp_path)[0]
        assert forward == {"call": "forward", "addr": f"tcp://127.0.0.1:{app.port}",
                           "options": {}, "token_given": True}
        # What the agent does with each public request: connect over loopback and name the
        # client and the scheme. The tunnel made loopback a trusted proxy.
        status, headers = get(app.base + "/health", FORWARDED)
        assert status in (200, 503)
        assert headers.get("Strict-Transport-Security") == "max-age=31536000"
        wait_until(lambda: re.search(r' 203\.0\.113\.7 "GET /health"', app.log), 5,
                   "the access line naming the forwarded client")
    finally:
        assert app.stop() == 0
    assert [r["call"] for r in record(tmp_path)] == ["forward", "close"]
    log = app.log
    assert log.index("closed the ngrok tunnel") < log.index("shutting down")
    assert TOKEN not in log


def test_a_tunnel_ngrok_refuses_stops_the_appliance_with_one_line(tmp_path: Path) -> None:
    app = Appliance(tmp_path, "--upstream", f"http://127.0.0.1:{free_port()}", "--tunnel",
                    "ngrok", env=fake_agent(tmp_path, FAKE_NGROK_REFUSE="1"))
    try:
        assert app.proc.wait(30) == 2
    finally:
        app.stop()
    log = app.log
    assert "Traceback" not in log and TOKEN not in log
    last = log.strip().splitlines()[-1]
    assert last == ("llama-proxy: configuration error: tunnel: ngrok refused the tunnel: failed "
                    "to connect session: authentication failed: The authtoken you specified "
                    "does not look like a proper ngrok authtoken. (ERR_NGROK_105)")
    assert "public URL" not in log
    # What had started was stopped: the listener, and the embedded Redis.
    with pytest.raises(OSError):
        urllib.request.urlopen(app.base + "/health", timeout=2)
    wait_until(lambda: not redis_servers_with(app.data_dir), 10, "the embedded Redis to stop")


@pytest.mark.parametrize(
    ("local", "address", "options"),
    [
        ("http://127.0.0.1:8000", "tcp://127.0.0.1:8000", {}),
        ("http://0.0.0.0:8000", "tcp://127.0.0.1:8000", {}),
        ("http://[::]:8000", "tcp://[::1]:8000", {}),
        ("http://[::1]:8000", "tcp://[::1]:8000", {}),
        ("https://0.0.0.0:8443", "https://127.0.0.1:8443", {"verify_upstream_tls": False}),
    ],
)
def test_the_agent_connects_to_our_listener_over_loopback(
    local: str, address: str, options: dict
) -> None:
    assert forward_target(local) == (address, options)


async def access_line(caplog: pytest.LogCaptureFixture, base: str
                      ) -> tuple[str, aiohttp.ClientResponse]:
    caplog.clear()
    async with aiohttp.ClientSession() as http, http.get(base + "/health",
                                                          headers=FORWARDED) as resp:
        await resp.read()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) == 1, lines
    return lines[0], resp


async def test_behind_the_tunnel_the_client_is_the_forwarded_one(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    # As the loader makes it for a tunnel: loopback is a trusted proxy.
    proxy = await make_proxy(upstreams=[fake.url], tunnel="ngrok", ngrok_authtoken=TOKEN)
    assert proxy.settings.trust_loopback_proxy
    line, resp = await access_line(caplog, proxy.base_url)
    assert ' 203.0.113.7 "GET /health"' in line and "127.0.0.1" not in line
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"


async def test_without_trust_the_forwarding_headers_are_ignored(
    make_proxy: ProxyFactory, fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(upstreams=[fake.url])
    assert not proxy.settings.trust_loopback_proxy
    line, resp = await access_line(caplog, proxy.base_url)
    assert ' 127.0.0.1 "GET /health"' in line and "203.0.113.7" not in line
    assert "Strict-Transport-Security" not in resp.headers
