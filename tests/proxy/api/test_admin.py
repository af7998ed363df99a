"""The admin API: only an admin credential gets in; keys and tokens can be managed end to end."""

from __future__ import annotations

import aiohttp

from proxy.server import Running
from tests.conftest import ADMIN_HEADERS, Fake, ProxyFactory, token_for

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def test_admin_needs_an_admin_credential(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url], auth="disabled")  # /admin is never open
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.base_url + "/admin/keys") as r:
            assert r.status == 401
        user = {"Authorization": f"Bearer {token_for(proxy)}"}
        async with http.get(proxy.base_url + "/admin/keys", headers=user) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "insufficient_scope"
        admin_jwt = {"Authorization": f"Bearer {token_for(proxy, scopes=['admin'])}"}
        async with http.get(proxy.base_url + "/admin/keys", headers=admin_jwt) as r:
            assert r.status == 200


async def test_key_lifecycle(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy: Running = await make_proxy(upstreams=[fake.url], key_cache_ttl=0)
    base = proxy.base_url
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin, \
            aiohttp.ClientSession() as user:
        async with admin.post(base + "/admin/keys",
                              json={"name": "phone", "rpm": 30, "models": ["fake-model"]}) as r:
            assert r.status == 201
            created = await r.json()
        key, prefix = created["key"], created["prefix"]
        assert "hash" not in created and created["rpm"] == 30
        headers = {"X-API-Key": key}
        async with user.post(base + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as r:
            assert r.status == 200
        async with admin.get(base + "/admin/keys") as r:
            listed = (await r.json())["data"]
        assert [k["prefix"] for k in listed] == [prefix] and "key" not in listed[0]
        async with admin.patch(base + f"/admin/keys/{prefix}", json={"tpm": 5000}) as r:
            assert (await r.json())["tpm"] == 5000
        async with admin.patch(base + f"/admin/keys/{prefix}", json={"rpm": -1}) as r:
            assert r.status == 400
        async with admin.delete(base + f"/admin/keys/{prefix}") as r:
            assert r.status == 200
        async with admin.get(base + f"/admin/keys/{prefix}") as r:
            assert (await r.json())["status"] == "revoked"
        async with user.post(base + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as r:
            assert r.status == 401
        async with admin.delete(base + "/admin/keys/nosuchkey") as r:
            assert r.status == 404


async def test_issue_token_through_admin(make_proxy: ProxyFactory, fake: Fake) -> None:
    proxy = await make_proxy(upstreams=[fake.url])
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin:
        async with admin.post(proxy.base_url + "/admin/tokens", json={"sub": "carol"}) as r:
            issued = await r.json()
        async with admin.post(proxy.base_url + "/admin/tokens", json={}) as r:
            assert r.status == 400
    async with aiohttp.ClientSession() as user:
        async with user.post(proxy.base_url + "/v1/chat/completions", json=CHAT_BODY,
                             headers={"Authorization": f"Bearer {issued['token']}"}) as r:
            assert r.status == 200


async def test_patch_racing_a_revoke_never_undoes_it(make_proxy: ProxyFactory, fake: Fake
                                                    ) -> None:
    import asyncio

    proxy: Running = await make_proxy(upstreams=[fake.url], key_cache_ttl=0)
    base = proxy.base_url
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as admin:
        for round_ in range(6):
            async with admin.post(base + "/admin/keys", json={"name": f"k{round_}"}) as r:
                created = await r.json()
            url = base + f"/admin/keys/{created['prefix']}"
            calls = [admin.delete(url), admin.patch(url, json={"rpm": 9, "name": "x"})]
            if round_ % 2:
                calls.reverse()
            for resp in await asyncio.gather(*calls):
                assert resp.status == 200
                resp.release()
            async with admin.get(url) as r:
                after = await r.json()
            assert after["status"] == "revoked" and after["rpm"] == 9
            async with aiohttp.ClientSession() as user:
                async with user.post(base + "/v1/chat/completions", json=CHAT_BODY,
                                     headers={"X-API-Key": created["key"]}) as r:
                    assert r.status == 401
