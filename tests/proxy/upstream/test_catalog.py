"""The model catalog with real llama-server children: the bundled model under several ids with
different settings, started on demand, stopped when idle, swapped without cutting a stream,
refused with Retry-After when there is no room, retried after a failed start."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from config.paths import bundled_model
from tests.kit.helpers import Appliance, pid_alive, wait_until

ADMIN = "a" * 40
MODEL = bundled_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the bundled model is not installed")
LONG = {"max_tokens": 300, "ignore_eos": True}  # about 4 s of the model on a 2-core machine


def catalog(tmp: Path, top: str, **models: str) -> Path:
    """A config file: top-level lines, then one [models.<id>] table each."""
    text = top + "\n" + "".join(f"\n[models.{name}]\n{table}\n" for name, table in
                                models.items())
    path = tmp / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture
def appliance(tmp_path: Path):
    started: list[Appliance] = []

    def make(config: Path, *args: str) -> Appliance:
        app = Appliance(tmp_path / f"a{len(started)}", "--config", str(config), "--auth",
                        "disabled", "--admin-key", ADMIN, *args)
        started.append(app)
        wait_until(lambda: get(app.base, "/health")[0] == 200, 60, "the appliance")
        return app

    yield make
    for app in started:
        app.stop()


def get(base: str, path: str, admin: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN}"} if admin else {}
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def ask(base: str, model: str, timeout: float = 120, **extra: Any
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 8, **extra}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def states(base: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in get(base, "/v1/models")[1]["data"]}


def admin_row(base: str, model: str) -> dict[str, Any]:
    rows = get(base, "/admin/models", admin=True)[1]["models"]
    return next(row for row in rows if row["id"] == model)


def starts(app: Appliance, model: str) -> int:
    return len(re.findall(rf"model {re.escape(model)}: starting", app.log))


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out


def sdk(base: str) -> openai.OpenAI:
    """The openai client with a JWT the appliance issued (it checks any credential sent)."""
    req = urllib.request.Request(base + "/admin/tokens", method="POST",
                                 data=json.dumps({"sub": "tester"}).encode(),
                                 headers={"Authorization": f"Bearer {ADMIN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        token = json.loads(resp.read())["token"]
    return openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)


def long_stream(base: str, model: str, first: threading.Event) -> dict[str, Any]:
    """A stream read to its end: its text, finish reason and when it ended."""
    client = sdk(base)
    pieces, finish = [], None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a long story"}],
        stream=True, max_tokens=LONG["max_tokens"], extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            first.set()
    return {"text": "".join(pieces), "chunks": len(pieces), "finish": finish,
            "ended": time.monotonic()}


def test_on_demand_one_shared_start_then_idle_stop(appliance, tmp_path: Path) -> None:
    config = catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"\nttl = 2\naliases = ["al"]',
                     beta=f'gguf = "{MODEL}"\nparallel = 1\nctx_size = 1024')
    app = appliance(config)
    assert states(app.base) == {"alpha": "unloaded", "beta": "unloaded"}
    status, health = get(app.base, "/health")  # nothing runs, and everything can be started
    assert status == 200 and health["status"] == "ok"
    assert {b["name"]: b["state"] for b in health["backends"]} == {
        "llama-server": "stopped", "llama-server:beta": "stopped"}

    asked = time.monotonic()
    threads = [in_thread(lambda: ask(app.base, "al")) for _ in range(4)]  # by its alias
    for thread, _ in threads:
        thread.join(120)
    cold = time.monotonic() - asked
    assert [out[0][0] for _, out in threads] == [200] * 4, [out for _, out in threads]
    assert {out[0][1]["model"] for _, out in threads} == {"alpha"}
    assert starts(app, "alpha") == 1  # four first requests, one start
    assert states(app.base) == {"alpha": "loaded", "beta": "unloaded"}
    row = admin_row(app.base, "alpha")
    assert row["loads"] == 1 and row["in_use"] == 0 and row["estimated_mib"] > 0
    assert 0 < row["load_seconds"] < cold

    # idle past its ttl (2 s): stopped, and its child is gone; beta (no ttl) was never started
    wait_until(lambda: states(app.base)["alpha"] == "unloaded", 15, "alpha's idle stop")
    assert admin_row(app.base, "alpha")["evictions"] == {"idle": 1}
    assert "model alpha: stopping (idle)" in app.log
    assert get(app.base, "/health")[0] == 200
    status, _, _ = ask(app.base, "alpha")  # and it comes back on the next request
    assert status == 200 and starts(app, "alpha") == 2


def test_max_loaded_one_waits_for_a_long_stream_then_swaps(appliance, tmp_path: Path) -> None:
    config = catalog(tmp_path, "max_loaded = 1", alpha=f'gguf = "{MODEL}"',
                     beta=f'gguf = "{MODEL}"')
    app = appliance(config)
    assert ask(app.base, "alpha")[0] == 200
    first = threading.Event()
    streaming, streamed = in_thread(lambda: long_stream(app.base, "alpha", first))
    assert first.wait(30), "alpha's stream did not start"
    asked, (waiting, answered) = time.monotonic(), in_thread(lambda: ask(app.base, "beta"))
    time.sleep(0.5)
    assert states(app.base) == {"alpha": "loaded", "beta": "unloaded"}  # beta waits for room
    streaming.join(60)
    waiting.join(60)
    stream, (status, body, _) = streamed[0], answered[0]
    assert stream["finish"] == "length" and stream["chunks"] >= LONG["max_tokens"] - 5, stream
    assert status == 200 and body["model"] == "beta", body
    # beta started only once alpha's stream had ended, and alpha made room for it
    assert time.monotonic() - asked > 1 and "model alpha: stopping (room)" in app.log
    log = app.log
    assert log.index("model alpha: stopping (room)") < log.index("model beta: starting")
    assert admin_row(app.base, "alpha")["evictions"] == {"room": 1}
    assert states(app.base) == {"alpha": "unloaded", "beta": "loaded"}


def test_no_room_is_503_with_retry_after(appliance, tmp_path: Path) -> None:
    # The budget fits one model (its estimate), not two; waiting for room ends after 2 s.
    probe = catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"')
    app = appliance(probe)
    one = admin_row(app.base, "alpha")["estimated_mib"]
    app.stop()
    config = catalog(tmp_path, f"memory_budget = {int(one * 1.5)}\nqueue_timeout = 2",
                     alpha=f'gguf = "{MODEL}"', beta=f'gguf = "{MODEL}"',
                     huge=f'gguf = "{MODEL}"\nctx_size = 1000000')
    app = appliance(config)
    status, body, headers = ask(app.base, "huge")  # over the budget alone: refused at once
    assert status == 503 and body["error"]["code"] == "no_room_for_model", body
    assert "memory budget" in body["error"]["message"] and int(headers["Retry-After"]) > 0
    assert starts(app, "huge") == 0

    first = threading.Event()
    streaming, _ = in_thread(lambda: long_stream(app.base, "alpha", first))
    assert first.wait(60)
    asked = time.monotonic()
    status, body, headers = ask(app.base, "beta")  # alpha is in use: no room within 2 s
    assert 1.5 < time.monotonic() - asked < 10
    assert status == 503 and body["error"]["code"] == "no_room_for_model", body
    assert int(headers["Retry-After"]) > 0 and starts(app, "beta") == 0
    streaming.join(60)
    assert ask(app.base, "beta")[0] == 200  # alpha idle now: stopped to make room


def test_a_failed_start_is_retried_after_its_backoff(appliance, tmp_path: Path) -> None:
    assert MODEL is not None
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF not really a model" * 100)
    config = catalog(tmp_path, "", good=f'gguf = "{MODEL}"', bad=f'gguf = "{broken}"')
    app = appliance(config)
    status, body, headers = ask(app.base, "bad")
    assert status == 503 and body["error"]["code"] == "backend_unavailable", body
    row = admin_row(app.base, "bad")
    assert row["state"] == "failed" and row["failures"] == 1 and row["last_output"], row
    assert states(app.base)["bad"] == "failed"
    assert get(app.base, "/health")[0] == 200  # the other model can still be started
    # within the backoff: refused at once, with how long to wait, and nothing started
    status, body, headers = ask(app.base, "bad")
    assert status == 503 and 1 <= int(headers["Retry-After"]) <= 5
    assert starts(app, "bad") == 1
    shutil.copyfile(MODEL, broken)  # the operator fixes the file
    wait_until(lambda: ask(app.base, "bad")[0] == 200, 30, "the fixed model to be served")
    assert starts(app, "bad") == 2 and states(app.base)["bad"] == "loaded"
    assert ask(app.base, "good")[0] == 200


def test_admin_load_and_unload(appliance, tmp_path: Path) -> None:
    config = catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"', beta=f'gguf = "{MODEL}"')
    app = appliance(config)
    req = urllib.request.Request(app.base + "/admin/models/beta/load", method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
    assert states(app.base)["beta"] == "loaded"
    first = threading.Event()
    streaming, _ = in_thread(lambda: long_stream(app.base, "beta", first))
    assert first.wait(30)
    req = urllib.request.Request(app.base + "/admin/models/beta/unload", method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # a stream holds it: not unloaded
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 409 and json.loads(err.value.read())["error"]["code"] == "model_busy"
    streaming.join(60)
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    assert states(app.base)["beta"] == "unloaded"
    assert admin_row(app.base, "beta")["evictions"] == {"unload": 1}
    status, _ = get(app.base, "/admin/models")  # the admin credential is needed
    assert status == 401


def test_openai_client_alternates_three_models_with_one_loaded(appliance, tmp_path: Path
                                                               ) -> None:
    config = catalog(tmp_path, "max_loaded = 1", alpha=f'gguf = "{MODEL}"',
                     beta=f'gguf = "{MODEL}"\nparallel = 1',
                     gamma=f'gguf = "{MODEL}"\nctx_size = 2048')
    app = appliance(config)
    client = sdk(app.base)
    for turn in range(6):
        model = ("alpha", "beta", "gamma")[turn % 3]
        if turn % 2:
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
            assert answer.model == model and answer.choices[0].message.content
        else:
            chunks = list(client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                stream=True))
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert sum(starts(app, m) for m in ("alpha", "beta", "gamma")) == 6


def test_workers_share_one_start_and_each_models_queue(appliance, tmp_path: Path) -> None:
    config = catalog(tmp_path, "admission_slots = 1", alpha=f'gguf = "{MODEL}"',
                     beta=f'gguf = "{MODEL}"')
    app = appliance(config, "--workers", "2")
    wait_until(lambda: "started 1 extra worker" in app.log, 20, "the worker")
    threads = [in_thread(lambda: ask(app.base, "alpha")) for _ in range(6)]
    for thread, _ in threads:
        thread.join(120)
    assert [out[0][0] for _, out in threads] == [200] * 6
    assert starts(app, "alpha") == 1  # asked of both processes, started once
    # alpha's one slot held by a long stream: beta's callers do not wait behind it
    first = threading.Event()
    streaming, streamed = in_thread(lambda: long_stream(app.base, "alpha", first))
    assert first.wait(30)
    for _ in range(4):  # over fresh connections: both processes answer some
        status, body, _ = ask(app.base, "beta")
        assert status == 200 and body["model"] == "beta"
    assert streaming.is_alive(), "beta waited for alpha's stream"
    streaming.join(60)
    assert streamed[0]["finish"] == "length"
    assert starts(app, "beta") == 1
    # a restart moves beta's child; every process is told where it now runs
    old = child_pid(app, "beta")
    assert post_admin(app.base, "/admin/models/beta/restart")[0] == 200
    wait_until(lambda: not pid_alive(old), 30, "the old child to stop")
    for _ in range(6):
        assert ask(app.base, "beta")[0] == 200


def test_a_stream_waiting_for_its_model_gets_keep_alives(appliance, tmp_path: Path) -> None:
    config = catalog(tmp_path, "sse_keepalive = 0.1", alpha=f'gguf = "{MODEL}"')
    app = appliance(config)
    body = json.dumps({"model": "alpha", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    req = urllib.request.Request(app.base + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        lines = [line.strip() for line in resp if line.strip()]
    first_data = next(i for i, line in enumerate(lines) if line.startswith(b"data:"))
    assert lines[:first_data] and set(lines[:first_data]) == {b": keep-alive"}, lines[:5]
    assert lines[-1] == b"data: [DONE]" and starts(app, "alpha") == 1


def test_a_swapped_out_conversation_comes_back_from_its_saved_slots(appliance, tmp_path: Path
                                                                    ) -> None:
    config = catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"\nctx_size = 2048\nparallel = 1')
    app = appliance(config)
    story = " ".join(f"Line {i}: the fox jumps over the dog near river {i}." for i in range(40))
    talk = [{"role": "user", "content": "Read this: " + story},
            {"role": "assistant", "content": "Done."}]

    def cache_n(messages: list[dict[str, str]]) -> int:
        status, body, _ = ask(app.base, "alpha", messages=messages, temperature=0)
        assert status == 200, body
        return int(body["timings"]["cache_n"]) if "timings" in body else -1

    ask(app.base, "alpha", messages=talk[:1], temperature=0)
    for action in ("unload", "load"):
        req = urllib.request.Request(f"{app.base}/admin/models/alpha/{action}", method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
        urllib.request.urlopen(req, timeout=60).read()
    assert re.search(r"model alpha: \d+ tokens of its slots saved", app.log)
    assert re.search(r"model alpha: \d+ tokens of its saved slots restored", app.log)
    cached = cache_n([*talk, {"role": "user", "content": "What was on line 7?"}])
    assert cached > 300, cached  # the history read from the restored cache, not recomputed
    saved = list((app.data_dir / "slots").glob("alpha-*/slot-0.bin"))
    assert len(saved) == 1 and saved[0].parent.stat().st_mode & 0o077 == 0


def test_saved_slots_stay_within_their_disk_budget(tmp_path: Path) -> None:
    from proxy.upstream.supervisor import prune_slots

    for n, name in enumerate(("a-1/slot-0.bin", "b-2/slot-0.bin", "b-2/slot-1.bin")):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 600 * 1024)
        os.utime(path, (1000 + n, 1000 + n))
    prune_slots(tmp_path, 1)  # 1 MiB: the oldest go until the rest fit
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*.bin")) == [
        "b-2/slot-1.bin"]


def child_pid(app: Appliance, model: str) -> int:
    """The pid of the model's newest child, from the log."""
    pids = re.findall(rf"started llama-server \(pid (\d+)\) on \S+ \(model {model}\)", app.log)
    return int(pids[-1])


def post_admin(base: str, path: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(base + path, method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_restart_under_steady_requests_shows_no_client_an_error(appliance, tmp_path: Path
                                                                  ) -> None:
    config = catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"')
    app = appliance(config)
    assert ask(app.base, "alpha")[0] == 200
    before = child_pid(app, "alpha")
    stop, results = threading.Event(), []

    def steady() -> None:
        client = sdk(app.base)
        while not stop.is_set():
            try:
                chunks = list(client.chat.completions.create(
                    model="alpha", messages=[{"role": "user", "content": "Count to ten"}],
                    max_tokens=40, stream=True, extra_body={"ignore_eos": True}))
                results.append(chunks[-1].choices[0].finish_reason)
            except Exception as exc:
                results.append(repr(exc))

    workers = [threading.Thread(target=steady, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    wait_until(lambda: len(results) >= 2, 30, "requests to flow")
    status, _ = post_admin(app.base, "/admin/models/alpha/restart")
    assert status == 200
    wait_until(lambda: "model alpha: restarted" in app.log, 30, "the switch")
    done = len(results)
    wait_until(lambda: len(results) >= done + 4, 60, "requests on the new child")
    stop.set()
    for worker in workers:
        worker.join(60)
    assert set(results) == {"length"}, [r for r in results if r != "length"]
    assert child_pid(app, "alpha") != before
    wait_until(lambda: not pid_alive(before), 30, "the old child to stop once drained")
    assert admin_row(app.base, "alpha")["state"] == "loaded"


def test_sighup_restarts_only_the_changed_model_and_no_stream_is_cut(appliance, tmp_path: Path
                                                                      ) -> None:
    # One thread each: four children spinning on two cores would slow every stream tenfold.
    one = f'gguf = "{MODEL}"\nllama_args = ["--threads", "1"]'
    config = catalog(tmp_path, "", alpha=one, beta=one, gone=one)
    app = appliance(config)
    for model in ("alpha", "beta", "gone"):
        assert ask(app.base, model)[0] == 200
    alpha, beta = child_pid(app, "alpha"), child_pid(app, "beta")
    first_a, first_b = threading.Event(), threading.Event()
    on_a, got_a = in_thread(lambda: long_stream(app.base, "alpha", first_a))
    on_b, got_b = in_thread(lambda: long_stream(app.base, "beta", first_b))
    assert first_a.wait(30) and first_b.wait(30)
    # alpha's arguments change, gone goes, delta comes; beta is untouched
    catalog(tmp_path, "", alpha=f'gguf = "{MODEL}"\nllama_args = ["--threads", "1", "--seed", '
            '"7"]', beta=one, delta=one)
    app.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "catalog reloaded" in app.log, 60, "the reload")
    assert "changed alpha" in app.log and "removed gone" in app.log and "added delta" in app.log
    on_a.join(60)
    on_b.join(60)
    for stream in (got_a[0], got_b[0]):  # both streams ran to their end
        assert stream["finish"] == "length" and stream["chunks"] >= LONG["max_tokens"] - 5
    assert child_pid(app, "beta") == beta and pid_alive(beta)  # untouched
    assert child_pid(app, "alpha") != alpha
    wait_until(lambda: not pid_alive(alpha), 30, "alpha's old child to stop")
    assert "--seed 7" in " ".join(open(f"/proc/{child_pid(app, 'alpha')}/cmdline").read()
                                  .split("\0"))
    assert ask(app.base, "gone")[0] == 404 and ask(app.base, "delta")[0] == 200
    assert sorted(states(app.base)) == ["alpha", "beta", "delta"]

    # a configuration that does not load changes nothing, and says why
    (tmp_path / "config.toml").write_text('[models.alpha]\ngguf = "/no/such.gguf"\n')
    status, body = post_admin(app.base, "/admin/reload")
    assert status == 400 and body["error"]["code"] == "invalid_config", body
    assert "models.alpha.gguf" in body["error"]["message"]
    assert sorted(states(app.base)) == ["alpha", "beta", "delta"]
