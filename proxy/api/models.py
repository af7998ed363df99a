"""/admin/models: the catalog's models (state, memory, use, loads, failures) and an operator's
load and unload. In an extra --workers process they are asked of the first process, which runs
the models."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.access.authn import PRINCIPAL
from proxy.access.limits import BORROWER
from proxy.api.routes import json_response
from proxy.errors import OpenAIError
from proxy.upstream.catalog import Unloaded
from proxy.upstream.pool import CATALOG

log = logging.getLogger("proxy.admin")
# Re-reads the configuration and applies the catalog's difference (set by the server).
RELOAD: web.AppKey[Callable[[], Awaitable[dict[str, Any]]]] = web.AppKey("reload_catalog")


async def list_models(request: web.Request) -> web.Response:
    if BORROWER in request.app:
        return json_response(await request.app[BORROWER].operate("admin"))
    return json_response(await request.app[CATALOG].admin())


async def load(request: web.Request) -> web.Response:
    return json_response(await _operate(request, "load"))


async def unload(request: web.Request) -> web.Response:
    return json_response(await _operate(request, "unload"))


async def restart(request: web.Request) -> web.Response:
    return json_response(await _operate(request, "restart"))


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file: the catalog's difference applied, the rest named."""
    log.info("admin %s: reload", request[PRINCIPAL].id)
    if BORROWER in request.app:
        return json_response(await request.app[BORROWER].operate("reload"))
    if RELOAD not in request.app:
        raise OpenAIError(409, "This appliance was not started from a configuration it can "
                          "read again", code="reload_unavailable")
    done = await request.app[RELOAD]()
    return json_response({"reloaded": done, **await request.app[CATALOG].admin()})


async def _operate(request: web.Request, op: str) -> dict[str, Any]:
    name = request.match_info["model"]
    log.info("admin %s: %s model %r", request[PRINCIPAL].id, op, name[:200])
    try:
        if BORROWER in request.app:
            return await request.app[BORROWER].operate(op, name)
        catalog = request.app[CATALOG]
        model = catalog.find(name)
        work = {"load": catalog.load, "unload": catalog.unload, "restart": catalog.restart}[op]
        await work(model)
        return await catalog.admin()
    except Unloaded as exc:
        raise OpenAIError(409, str(exc), code=exc.code) from None


def setup_models(app: web.Application) -> None:
    app.router.add_get("/admin/models", list_models)
    # Model ids may hold a slash (org/model), as Hugging Face names do.
    app.router.add_post("/admin/models/{model:.+}/load", load)
    app.router.add_post("/admin/models/{model:.+}/unload", unload)
    app.router.add_post("/admin/models/{model:.+}/restart", restart)
    app.router.add_post("/admin/reload", reload)
