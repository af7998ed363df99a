"""`python -m proxy` from a shell: one clear line for bad configuration, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.helpers import REPO


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"llama-proxy: configuration error: {setting}: ")


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--model", "/no/such.gguf"], "model"),
        (["--port", "123456"], "port"),
        (["--upstream", "not-a-url"], "upstreams"),
        (["--admin-key", "too-short"], "admin_key"),
        (["--jwt-algorithms", "HS256", "--jwt-algorithms", "RS256"], "jwt_algorithms"),
    ],
)
def test_bad_flags(args: list[str], setting: str) -> None:
    assert_one_line_error(run("--port", "0", *args), setting)


def test_binary_that_cannot_run(tmp_path: Path) -> None:
    not_executable = tmp_path / "llama-server"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    assert_one_line_error(run("--port", "0", "--llama-server", str(not_executable)),
                          "llama_server")


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    result = run("--port", "0", "--data-dir", str(tmp_path / "d"),
                 "--redis-url", "redis://:pw@127.0.0.1:1/0")
    assert_one_line_error(result, "redis_url")
    assert "127.0.0.1:1/0 is unreachable" in result.stderr and "pw" not in result.stderr


def test_bad_config_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    assert_one_line_error(run("--port", "0", "--config", str(broken)), "config")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    assert_one_line_error(run("--port", "0", "--config", str(unknown)), "colour")


def test_port_in_use_fails_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(result, "port")
    assert "already in use" in result.stderr.lower()
    assert not (tmp_path / "d").exists()  # nothing was started or written


def test_check_config_prints_effective_settings_with_secrets_masked() -> None:
    result = run("check-config", "--upstream", "http://127.0.0.1:1234/v1",
                 "--upstream", "http://user:pa55word@127.0.0.1:1235",
                 "--upstream-api-key", "hunter2-secret")
    assert result.returncode == 0, result.stderr
    assert ('upstreams = ["http://127.0.0.1:1234","http://user:***@127.0.0.1:1235"]'
            in result.stdout)
    assert "pa55word" not in result.stdout
    assert 'upstream_api_key = "***"' in result.stdout
    assert "hunter2" not in result.stdout
    assert "gguf" not in result.stdout  # a catalog of one model, its upstreams alone


def test_help_lists_the_documented_flags() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--model", "--llama-server", "--llama-arg",
                 "--parallel", "--upstream", "--log-level", "--log-format", "--config"):
        assert flag in result.stdout
