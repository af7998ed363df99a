"""generate_token.py --qr: a sign-in link to the chat page with the credential in the URL
fragment (never sent to a server), drawn as a QR code and printed as text; and --snippets for an
ngrok URL name the header that skips the free plan's browser warning."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest

from proxy.token_cli import qr_code, sign_in_link
from tests.conftest import Fake, ProxyFactory
from tests.kit.helpers import REPO

BASE = "https://example.ngrok-free.app"


def generate(data_dir: Path, redis_url: str | None, *args: str
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_PROXY_")}
    if redis_url:
        env["LLAMA_PROXY_REDIS_URL"] = redis_url  # the appliance's Redis, as its config says
    return subprocess.run([sys.executable, "generate_token.py", "--data-dir", str(data_dir),
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def link_in(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The printed link and the credential (the last line of stdout, as always)."""
    assert result.returncode == 0, result.stderr
    credential = result.stdout.strip().splitlines()[-1]
    links = re.findall(r"^https://\S+$", result.stderr, re.MULTILINE)
    assert len(links) == 1, result.stderr
    return links[0], credential


@pytest.mark.parametrize("kind", [["alice", "1"], ["phone", "--api-key"]], ids=["jwt", "key"])
async def test_the_qr_link_signs_in_with_a_credential_that_works(
    make_proxy: ProxyFactory, fake: Fake, redis_url: str, caplog: pytest.LogCaptureFixture,
    kind: list[str],
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await make_proxy(upstreams=[fake.url])
    result = await asyncio.to_thread(generate, proxy.settings.data_dir, redis_url, *kind,
                                     "--qr", "--base-url", BASE + "/")
    link, credential = link_in(result)
    page, _, fragment = link.partition("#")
    assert page == BASE + "/"  # the chat page; the credential only in the fragment
    assert fragment.startswith("token=") and unquote(fragment[6:]) == credential
    assert qr_code(link) in result.stderr  # the QR code is of that very link
    assert f"{BASE}/v1\n" not in result.stderr  # no longer the old "base URL, credential" text

    async with aiohttp.ClientSession() as http:
        bearer = {"Authorization": f"Bearer {unquote(fragment[6:])}"}
        async with http.get(proxy.base_url + "/v1/models", headers=bearer) as r:
            assert r.status == 200, await r.text()
        async with http.get(proxy.base_url + "/v1/models") as r:
            assert r.status == 401
    assert credential not in caplog.text


def test_the_link_encodes_what_a_fragment_cannot_carry_as_is() -> None:
    # URLSearchParams (the page) reads "+" as a space: anything but unreserved is escaped.
    link = sign_in_link(BASE, "a+b/c=d&e f")
    assert link == f"{BASE}/#token=a%2Bb%2Fc%3Dd%26e%20f"


@pytest.mark.parametrize(("base", "mentioned"), [(BASE, True), ("https://abc.ngrok.app", True),
                                                 ("https://llm.example.com", False)])
def test_snippets_for_ngrok_name_the_browser_warning_header(
    tmp_path: Path, base: str, mentioned: bool
) -> None:
    result = generate(tmp_path / "data", None, "alice", "1", "--snippets", "--base-url", base)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert f'base_url="{base}/v1"' in result.stderr  # the others still there
    assert f'export OPENAI_API_KEY="{token}"' in result.stderr
    assert ('"ngrok-skip-browser-warning": "1"' in result.stderr) is mentioned
