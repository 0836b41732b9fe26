"""`/v1/encrypt`: the selected encryption's state (`pylium encrypt status`, as
`cilium-dbg encrypt status`) and key rotation (`pylium encrypt rotate`)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.errors import UserError


def setup(app: web.Application, daemon: Daemon) -> None:
    def report() -> dict[str, Any]:
        events = daemon.components.get("encryption")
        if events is None:
            return {"enabled": False, "mode": "disabled"}
        return {"enabled": True, "mode": events.name, **events.backend_status(),
                "errors": dict(events.errors)}

    async def status(_request):
        return web.json_response(await asyncio.to_thread(report))

    async def rotate(_request):
        events = daemon.components.get("encryption")
        if events is None:
            raise UserError("encryption is not enabled on this node (config `encryption`)")
        key = await asyncio.to_thread(events.backend.rotate_key)
        events.setup_result = key
        cluster = daemon.components.get("cluster")
        if cluster is not None:
            await cluster.set_encryption_key(key)
        return web.json_response(await asyncio.to_thread(report))

    app.router.add_get("/v1/encrypt", status)
    app.router.add_post("/v1/encrypt/rotate", rotate)
