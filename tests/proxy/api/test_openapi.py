"""The OpenAPI document is true to the code, and schemathesis finds no 5xx and no answer that
breaks it, against a live appliance (with the fast fake upstream behind it)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN_KEY, Fake, ProxyFactory

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


async def test_every_route_is_documented_and_every_documented_path_is_a_route(
    make_proxy: ProxyFactory, fake: Fake
) -> None:
    proxy = await make_proxy(upstreams=[fake.url])
    routes = {(r.method, r.resource.canonical) for r in proxy.app.router.routes()
              if r.method != "HEAD"}  # aiohttp adds HEAD to every GET by itself
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/openapi.json") as resp:
            assert resp.status == 200
            document = await resp.json()
    documented = {(method.upper(), path) for path, operations in document["paths"].items()
                  for method in operations}
    assert routes == documented
    assert document["openapi"].startswith("3.")


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    make_proxy: ProxyFactory, fake: Fake, tmp_path: Path
) -> None:
    # Its unauthenticated probes would soon trip the failed-login block (429 for everything).
    proxy = await make_proxy(upstreams=[fake.url], auth_fail_limit=1_000_000)
    command = [
        str(SCHEMATHESIS), "run", proxy.base_url + "/openapi.json",
        "--header", f"Authorization: Bearer {ADMIN_KEY}",
        "--checks", "all",
        # DELETE revokes (the record stays, marked revoked), so these stateful ideas do not
        # apply: a revoked key is still there to look at. And a credential may come in either
        # of two headers, so neither one alone is "required".
        "--exclude-checks",
        "use_after_free,ensure_resource_availability,missing_required_header",
        "--max-examples", "20", "--seed", "20261123", "--workers", "1",
        "--generation-database", "none", "--request-timeout", "10",
        "--max-time", "40", "--no-color", "--report", "junit",
        "--report-dir", str(tmp_path),
    ]
    run = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(run.communicate(), 300)
    text = output.decode(errors="replace")
    assert run.returncode == 0, text[-6000:]
    assert "passed" in text.lower()
