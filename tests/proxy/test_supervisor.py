"""The appliance as a real process supervising a real llama-server: restarts, drain, no orphans."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import Appliance, http_status, pid_alive, wait_until


@pytest.fixture
def appliance(tmp_path: Path):
    started: list[Appliance] = []

    def make(*args: str) -> Appliance:
        # Supervision is under test here; auth has its own tests (and the embedded Redis runs).
        app = Appliance(tmp_path / f"a{len(started)}", "--auth", "disabled", *args)
        started.append(app)
        return app

    yield make
    for app in started:
        app.stop()


def post(base: str, body: dict, timeout: float = 30) -> dict:
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def health(base: str) -> dict:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:  # not listening yet
        return {}


HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(stat.S_IRWXU)
    return path


def test_child_killed_is_restarted_and_serves_again(appliance) -> None:
    app = appliance()
    app.wait_ready()
    assert post(app.base, HELLO)["choices"]
    first = app.child_pids()[-1]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(app.child_pids()) == 2, 10, "a restarted llama-server")
    app.wait_ready(30)
    assert post(app.base, HELLO)["choices"]
    assert "killed by SIGKILL; restarting" in app.log
    assert not pid_alive(first)


def test_data_dir_and_secrets_are_owner_only(appliance) -> None:
    app = appliance()
    app.wait_ready()
    assert stat.S_IMODE(app.data_dir.stat().st_mode) == 0o700
    key_file = app.data_dir / "llama-server.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((app.data_dir / "logs" / "llama-server.log").stat().st_mode) == 0o600
    # The child's key protects it from other local processes, and never reaches our log.
    key = key_file.read_text().strip()
    child_url = app.log.split("started llama-server")[1].split(" on ")[1].split()[0]
    assert http_status(f"http://{child_url}/slots") == 401
    assert key not in app.log


def test_sigterm_drains_streams_then_stops_the_child(appliance) -> None:
    app = appliance("--shutdown-grace", "20")
    app.wait_ready()
    child = app.child_pids()[-1]
    body = {"prompt": "Count:", "max_tokens": 150, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(app.base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    lines: list[bytes] = []
    first_chunk = threading.Event()

    def read() -> None:
        with urllib.request.urlopen(req, timeout=60) as resp:
            for line in resp:
                lines.append(line)
                first_chunk.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_chunk.wait(20)
    app.proc.send_signal(signal.SIGTERM)
    # No new connections while the stream finishes.
    wait_until(lambda: http_status(app.base + "/health", timeout=0.5) is None, 5, "port closed")
    reader.join(30)
    assert lines[-2].strip() == b"data: [DONE]"
    assert app.proc.wait(30) == 0
    assert not pid_alive(child)


def test_appliance_killed_hard_takes_its_child_along(appliance) -> None:
    app = appliance()
    app.wait_ready()
    child = app.child_pids()[-1]
    app.proc.kill()
    app.proc.wait()
    wait_until(lambda: not pid_alive(child), 5, "the orphaned llama-server to die")


def test_repeated_crashes_stop_retrying_and_say_why(appliance, tmp_path: Path) -> None:
    crasher = script(tmp_path / "crash.sh", "echo 'boom: cannot load model' >&2\nexit 3\n")
    app = appliance("--llama-server", str(crasher), "--restart-limit", "2")
    wait_until(lambda: health(app.base).get("status") == "down", 20, "health to turn red")
    state = health(app.base)["backends"][0]
    assert state["state"] == "failed"
    assert "gave up after 2 crashes" in state["reason"]
    assert http_status(app.base + "/health") == 503 and http_status(app.base + "/ready") == 503
    assert "boom: cannot load model" in app.log
    req = urllib.request.Request(app.base + "/v1/chat/completions",
                                 data=json.dumps(HELLO).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 503
    assert json.loads(err.value.read())["error"]["code"] == "backend_unavailable"


def test_child_that_never_gets_healthy_is_killed(appliance, tmp_path: Path) -> None:
    pid_file = tmp_path / "hang.pid"
    hanger = script(tmp_path / "hang.sh", f"echo $$ > {pid_file}\nexec sleep 600\n")
    app = appliance("--llama-server", str(hanger), "--startup-timeout", "1",
                    "--restart-limit", "1")
    wait_until(lambda: health(app.base).get("status") == "down", 20, "health to turn red")
    assert "was not healthy within 1s" in health(app.base)["backends"][0]["reason"]
    wait_until(lambda: not pid_alive(int(pid_file.read_text())), 5, "the hung child to die")


def test_loading_model_answers_503_with_retry_after(appliance, tmp_path: Path) -> None:
    slow = script(tmp_path / "slow.sh", "exec sleep 600\n")
    app = appliance("--llama-server", str(slow))
    wait_until(lambda: http_status(app.base + "/health") is not None, 20, "the appliance")
    assert health(app.base)["status"] == "starting"
    req = urllib.request.Request(app.base + "/v1/chat/completions",
                                 data=json.dumps(HELLO).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 503 and err.value.headers["Retry-After"]
    assert json.loads(err.value.read())["error"]["code"] == "model_loading"


def test_workers_share_the_port_the_child_and_the_limits(appliance) -> None:
    app = appliance("--workers", "2", "--limit-rpm", "10")
    app.wait_ready()
    wait_until(lambda: "worker listening" in app.log, 20, "the extra worker")
    # Fresh connections land on either process: wait until both say they are ready.
    wait_until(lambda: all(http_status(app.base + "/ready") == 200 for _ in range(10)), 20,
               "both processes to be ready")
    statuses = []
    for _ in range(30):  # a fresh connection each time, so the kernel spreads them
        try:
            post(app.base, HELLO)
            statuses.append(200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    assert statuses.count(200) == 10 and statuses.count(429) == 20  # one limit, not two
    serving = set(re.findall(r"proxy\.access\[(\d+)\]", app.log))
    assert len(serving) == 2
    worker = int(re.search(r"proxy\[(\d+)\]: worker listening", app.log).group(1))
    child = app.child_pids()[-1]
    assert app.stop() == 0
    wait_until(lambda: not pid_alive(worker) and not pid_alive(child), 10, "everything to stop")
