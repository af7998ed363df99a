"""The user's path: run the appliance, issue a credential with generate_token.py, chat with it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.kit.helpers import REPO, Appliance, redis_servers_with, wait_until


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


def post_many(base: str, credential: str, count: int) -> list[int]:
    async def run() -> list[int]:
        async def one(http: aiohttp.ClientSession) -> int:
            async with http.post(base + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}) as resp:
                await resp.read()
                return resp.status

        headers = {"Authorization": f"Bearer {credential}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            return await asyncio.gather(*(one(http) for _ in range(count)))

    return asyncio.run(run())


def test_the_readme_sequence_keeps_one_redis_and_revocations_apply(tmp_path: Path) -> None:
    app = Appliance(tmp_path, default_limits=True)  # as the README runs it: embedded Redis
    try:
        app.wait_ready()
        sock = app.data_dir / "redis.sock"
        key = last_line(generate(app.data_dir, "phone", "--api-key", "--rpm", "5"))
        assert sock.exists()  # the tool left the appliance's Redis alone
        statuses = post_many(app.base, key, 20)
        assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses
        prefix = key[3:11]
        assert "revoked API key" in last_line(generate(app.data_dir, "--revoke", prefix))
        listing = generate(app.data_dir, "--list").stdout
        assert any(prefix in row and "revoked" in row for row in listing.splitlines())
        # The appliance sees the revocation within key_cache_ttl (5 s).
        wait_until(lambda: post_many(app.base, key, 1) == [401], 6, "the key to be refused")
        other = last_line(generate(app.data_dir, "laptop", "--api-key"))
        assert chat(app.base, other).strip()  # a key made now is known to the appliance
        # The shipped limits apply out of the box, and say so in OpenAI's headers.
        client = openai.OpenAI(base_url=app.base + "/v1", api_key=other, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        assert raw.headers["x-ratelimit-limit-tokens"] == "20000"
        assert sock.exists()
        assert len(redis_servers_with(sock)) == 1
    finally:
        assert app.stop() == 0
    wait_until(lambda: not redis_servers_with(sock), 10, "Redis to stop with the appliance")


def test_what_the_appliance_prints_works_when_pasted(tmp_path: Path) -> None:
    """The start-up lines tell a new user how to get a credential and a first answer; with a
    data dir of their own, the printed commands must use it. With the shipped limits, as a new
    user has them: the pasted request sets no max_tokens, and without a token limit the model
    would write until its context is full (minutes on a busy machine)."""
    app = Appliance(tmp_path, default_limits=True)  # the helper passes its own --data-dir
    try:
        app.wait_ready()
        wait_until(lambda: "is ready: try" in app.log, 10, "the ready hint")
        printed = app.log.split("is ready: try\n", 1)[1].splitlines()[:2]
        hint = "\n".join(line.strip() for line in printed)
        assert f"--data-dir {app.data_dir}" in hint
        result = subprocess.run(["bash", "-c", hint], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["choices"][0]["message"]["content"]
        line = next(x for x in app.log.splitlines() if x.startswith("credentials: "))
        command = line.removeprefix("credentials: ").split("   (a JWT)")[0]
        token = subprocess.run(["bash", "-c", command.replace("NAME", "bob")], cwd=REPO,
                               capture_output=True, text=True, timeout=60).stdout.split()[-1]
        assert chat(app.base, token).strip()
    finally:
        assert app.stop() == 0
