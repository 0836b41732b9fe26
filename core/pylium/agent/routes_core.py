"""Health, status, config and plugin listing."""

from __future__ import annotations

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.config import to_dict
from pylium.plugin_report import plugin_report


def setup(app: web.Application, daemon: Daemon) -> None:
    async def healthz(_request):
        status = await daemon.status()
        return web.json_response({"healthy": status["healthy"]},
                                 status=200 if status["healthy"] else 503)

    async def status(_request):
        return web.json_response(await daemon.status())

    async def config(_request):
        return web.json_response(to_dict(daemon.config))

    async def plugins(_request):
        states = {(r["kind"], r["name"]): r["state"] for r in daemon.capabilities.report()}
        return web.json_response(plugin_report(daemon.plugins, daemon.selected(), states))

    app.router.add_get("/v1/healthz", healthz)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/config", config)
    app.router.add_get("/v1/plugins", plugins)
