"""The browser chat page at `/`: static files shipped in the package (proxy/api/static), no build
step and nothing fetched from elsewhere, under a strict Content-Security-Policy. The page keeps
its credential in the browser and sends it in a header; the server never sees it in a URL."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
# Only the page's own files; no inline script or style, no frames, no form posts anywhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.FileResponse:
    """One of the page's own files, by name (the set is fixed at start-up: no paths)."""
    name = request.match_info["name"]
    if name not in request.app[ASSETS]:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name)


async def _stamp_csp(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Content-Security-Policy"] = CSP
        response.headers.setdefault("Cache-Control", "no-cache")


ASSETS = web.AppKey("assets", frozenset)


def setup_page(app: web.Application) -> None:
    app[ASSETS] = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", asset)
    app.on_response_prepare.append(_stamp_csp)
