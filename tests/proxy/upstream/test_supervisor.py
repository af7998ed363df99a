"""The appliance as a real process supervising a real llama-server: restarts, drain, no orphans."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.kit.helpers import Appliance, http_status, pid_alive, wait_until


@pytest.fixture
def appliance(tmp_path: Path):
    started: list[Appliance] = []

    def make(*args: str, data_dir: Path | None = None) -> Appliance:
        # Supervision is under test here; auth has its own tests (and the embedded Redis runs).
        app = Appliance(tmp_path / f"a{len(started)}", "--auth", "disabled", *args,
                        data_dir=data_dir)
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
    child_url = re.search(r"started llama-server \(pid \d+\) on (\S+)", app.log).group(1)
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


def test_appliance_killed_hard_takes_its_children_along(appliance) -> None:
    app = appliance("--workers", "2")
    app.wait_ready()
    wait_until(lambda: "worker listening" in app.log, 20, "the extra worker")
    children = [app.child_pids()[-1],
                int(re.search(r"embedded Redis \(pid (\d+)\)", app.log).group(1)),
                int(re.search(r"proxy\[(\d+)\]: worker listening", app.log).group(1))]
    assert all(pid_alive(pid) for pid in children)
    app.proc.kill()
    app.proc.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in children), 5,
               "llama-server, Redis and the worker to die with the appliance")
    # What the killed one left in its data dir (named after its pid) goes at the next start.
    left = sorted(p.name for p in app.data_dir.glob(f"*-{app.proc.pid}.*"))
    assert left == [f"slots-{app.proc.pid}.sock", f"worker-settings-{app.proc.pid}.json"]
    again = appliance("--workers", "2", data_dir=app.data_dir)
    again.wait_ready()
    wait_until(lambda: "started 1 extra worker" in again.log, 10, "the workers to start")
    assert not list(app.data_dir.glob(f"*-{app.proc.pid}.*"))


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
    app = appliance("--llama-server", str(slow), "--startup-timeout", "3")
    wait_until(lambda: http_status(app.base + "/health") is not None, 20, "the appliance")
    assert health(app.base)["status"] == "starting"
    req = urllib.request.Request(app.base + "/v1/chat/completions",
                                 data=json.dumps(HELLO).encode(),
                                 headers={"Content-Type": "application/json"})
    asked = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as err:  # it waits for the start, up to its limit
        urllib.request.urlopen(req, timeout=20)
    assert 2.5 <= time.monotonic() - asked < 15
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


def test_a_huge_output_line_neither_stops_the_pump_nor_hangs_shutdown(appliance, tmp_path: Path
                                                                     ) -> None:
    from config.paths import bundled_llama_server

    # 1 MiB on one line (the pump used to die past 64 KiB; the child then blocked on the pipe).
    wrapper = script(tmp_path / "noisy.sh",
                     "head -c 1048576 /dev/zero | tr '\\0' x >&2\necho >&2\n"
                     f'exec {bundled_llama_server()} "$@"\n')
    app = appliance("--llama-server", str(wrapper), "--shutdown-grace", "5",
                    "--child-stop-grace", "5")
    app.wait_ready()
    assert post(app.base, HELLO)["choices"]
    assert "... (line truncated)" in app.log
    child = app.child_pids()[-1]
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(15) == 0
    assert not pid_alive(child)


def test_a_stalled_log_file_never_stalls_requests(appliance, tmp_path: Path) -> None:
    # A FIFO nobody reads: opening or writing it blocks forever, as a dead disk would.
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    os.mkfifo(data / "logs" / "llama-server.log")
    app = appliance(data_dir=data)
    app.wait_ready()
    assert post(app.base, HELLO)["choices"]
    assert "llama-server:" in app.log or "llama-server[" in app.log  # still logged to stderr
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(20) == 0


def test_shutdown_past_its_grace_answers_every_request(appliance) -> None:
    app = appliance("--shutdown-grace", "3")  # --parallel 2: two slots
    app.wait_ready()
    long_stream = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    results: dict[str, tuple[int, dict[str, str], bytes]] = {}
    first_chunks = [threading.Event(), threading.Event()]

    def call(name: str, body: dict, started: threading.Event | None = None) -> None:
        req = urllib.request.Request(app.base + "/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                chunks = []
                for line in resp:
                    chunks.append(line)
                    if started is not None:
                        started.set()
                results[name] = (resp.status, dict(resp.headers), b"".join(chunks))
        except urllib.error.HTTPError as exc:
            results[name] = (exc.code, dict(exc.headers), exc.read())

    threads = [threading.Thread(target=call, args=(f"stream{i}", long_stream, first_chunks[i]))
               for i in range(2)]
    threads += [threading.Thread(target=call, args=("queued-stream", long_stream)),
                threading.Thread(target=call, args=("queued-whole", {**long_stream,
                                                                    "stream": False}))]
    for thread in threads[:2]:
        thread.start()
    assert all(event.wait(20) for event in first_chunks)
    for thread in threads[2:]:
        thread.start()
    wait_until(lambda: health(app.base)["queue"]["waiting"] == 2, 10, "two queued requests")
    app.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    for name in ("stream0", "stream1"):
        status, _, body = results[name]
        events = [e for e in body.split(b"\n\n") if e.strip()]
        assert status == 200 and b"[DONE]" not in body
        assert json.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    for name in ("queued-stream", "queued-whole"):
        status, headers, body = results[name]
        assert status == 503 and headers["Retry-After"], (name, status)
        assert json.loads(body)["error"]["code"] == "shutting_down"
    assert app.proc.wait(20) == 0
    assert "Traceback" not in app.log and "InvalidStateError" not in app.log


def test_no_child_is_started_with_a_preexec_fn() -> None:
    """preexec_fn runs Python between fork and exec, which is unsafe once the process has
    threads (the log writers are threads); the death signal is set by setpriv instead."""
    import ast

    from tests.kit.helpers import REPO

    found = [f"{file.relative_to(REPO)}:{node.lineno}"
             for package in ("proxy", "auth", "config") for file in (REPO / package).glob("*.py")
             for node in ast.walk(ast.parse(file.read_text()))
             if isinstance(node, ast.keyword) and node.arg == "preexec_fn"]
    assert found == []


def test_a_second_appliance_on_the_same_data_dir_is_refused(appliance) -> None:
    first = appliance()
    first.wait_ready()
    key = (first.data_dir / "llama-server.key").read_text()
    second = appliance(data_dir=first.data_dir)
    assert second.proc.wait(30) == 2
    assert "another appliance is already running" in second.log
    assert "Traceback" not in second.log
    assert (first.data_dir / "llama-server.key").read_text() == key  # the first one untouched
    assert post(first.base, HELLO)["choices"]
