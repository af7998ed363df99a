"""The user's path: run the appliance, issue a credential with generate_token.py, chat with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.helpers import REPO, Appliance


def generate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "generate_token.py", "--data-dir", str(data_dir),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def chat(base: str, credential: str) -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key=credential, max_retries=0)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=12, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_token_and_key_from_generate_token_work_with_openai(tmp_path: Path) -> None:
    app = Appliance(tmp_path)  # defaults: auth required, embedded Redis, bundled model
    try:
        app.wait_ready()
        token = last_line(generate(app.data_dir, "alice", "24"))
        assert token.count(".") == 2
        assert chat(app.base, token).strip()
        with pytest.raises(openai.AuthenticationError):
            chat(app.base, "not-a-credential")
        key = last_line(generate(app.data_dir, "phone", "--api-key", "--rpm", "30"))
        assert key.startswith("sk-")
        assert chat(app.base, key).strip()
        listing = generate(app.data_dir, "--list")
        prefix = key[3:11]
        assert prefix in listing.stdout and "phone" in listing.stdout
        assert key not in listing.stdout + listing.stderr + app.log
        assert token not in app.log
    finally:
        assert app.stop() == 0

    # Keys live in the embedded Redis's append-only file: they survive a restart, and a
    # revocation made while the appliance is down holds when it comes back.
    second = Appliance(tmp_path / "second", data_dir=app.data_dir)
    try:
        second.wait_ready()
        assert chat(second.base, key).strip()
        assert "revoked API key" in last_line(generate(app.data_dir, "--revoke", prefix))
    finally:
        assert second.stop() == 0
    third = Appliance(tmp_path / "third", data_dir=app.data_dir)
    try:
        third.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            chat(third.base, key)
        assert chat(third.base, token).strip()
    finally:
        assert third.stop() == 0


def test_snippets_and_qr_for_a_phone(tmp_path: Path) -> None:
    result = generate(tmp_path / "data", "alice", "1", "--snippets", "--qr",
                      "--base-url", "https://abc.ngrok.app")
    token = last_line(result)
    assert f'export OPENAI_API_KEY="{token}"' in result.stderr
    assert 'base_url="https://abc.ngrok.app/v1"' in result.stderr
    assert "\u2588" in result.stderr  # qrencode's block characters


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    result = generate(tmp_path / "data", "--config", str(tmp_path / "missing.toml"), "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
