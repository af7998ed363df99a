"""The floor of this design, for `make bench`: the least an aiohttp relay can do (aiohttp server,
aiohttp client, uvloop, as the appliance uses them) and nothing else: no authentication, limits,
deadlines, metrics or logs. Where the appliance stands between it and nginx shows what its own
features cost and what only another design (another server core) would win.

    python -m bench.floor --upstream http://127.0.0.1:8080 --port 8001
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import uvloop
from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web

from proxy.server import tune_gc

CLIENT = web.AppKey("client", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    upstream = await request.app[CLIENT].request(
        request.method, request.app[UPSTREAM] + request.path, data=raw,
        headers={"Content-Type": "application/json"})
    try:
        if upstream.content_type != "text/event-stream":
            return web.Response(status=upstream.status, body=await upstream.read(),
                                content_type=upstream.content_type)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while chunk := await upstream.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def client(app: web.Application) -> AsyncIterator[None]:
    async with ClientSession(connector=TCPConnector(limit=0),
                             cookie_jar=DummyCookieJar()) as session:
        app[CLIENT] = session
        yield


async def _tune_gc(app: web.Application) -> None:
    tune_gc()  # the appliance's GC settings: like for like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", relay)
    app.on_startup.append(_tune_gc)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
