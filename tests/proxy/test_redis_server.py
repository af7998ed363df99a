"""The embedded Redis: started with the appliance, restarted if it dies, its data kept."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import openai

from tests.helpers import Appliance, pid_alive, wait_until
from tests.test_generate_token import chat, generate, last_line


def redis_pids(app: Appliance) -> list[int]:
    return [int(p) for p in re.findall(r"embedded Redis \(pid (\d+)\)", app.log)]


def test_embedded_redis_is_restarted_and_keeps_its_keys(tmp_path: Path) -> None:
    app = Appliance(tmp_path)
    try:
        app.wait_ready()
        key = last_line(generate(app.data_dir, "before", "--api-key"))
        time.sleep(1.2)  # appendfsync everysec: the key is on disk after a second
        first = redis_pids(app)[-1]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(redis_pids(app)) == 2, 15, "the embedded Redis to restart")
        assert "embedded redis-server exited with -9" in app.log
        assert not pid_alive(first)
        assert chat(app.base, key).strip()  # a key from before the crash, read from disk
        after = last_line(generate(app.data_dir, "after", "--api-key"))
        assert chat(app.base, after).strip()
        try:
            chat(app.base, "sk-00000000_" + "x" * 43)
            raise AssertionError("an unknown key was accepted")
        except openai.AuthenticationError:
            pass
        second = redis_pids(app)[-1]
    finally:
        assert app.stop() == 0
    wait_until(lambda: not pid_alive(second), 10, "Redis to stop with the appliance")
