"""`/v1/bpf/*`: what is loaded in the kernel (endpoints, policy, ipcache, conntrack,
metrics) and `POST /v1/bpf/trace` (the loaded program's verdict on a synthesized packet)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.errors import PyliumError, UserError


def setup(app: web.Application, daemon: Daemon) -> None:
    def datapath():
        dp = daemon.components.get("datapath")
        if dp is None:
            raise PyliumError("the datapath component is not running")
        return dp

    def listing(method: str):
        async def handler(_request):
            return web.json_response(await asyncio.to_thread(getattr(datapath(), method)))
        return handler

    async def policy(request):
        try:
            ep_id = int(request.match_info["ep_id"])
        except ValueError:
            raise UserError(f"endpoint id {request.match_info['ep_id']!r} is not a number") from None
        dump = await asyncio.to_thread(datapath().dump_policy, ep_id)
        if not dump["loaded"]:
            raise NotFound(f"no policy map loaded for endpoint {ep_id}")
        return web.json_response(dump)

    async def trace(request):
        body = await read_json(request)
        missing = [k for k in ("ep_id", "direction", "src_ip", "dst_ip") if k not in body]
        if missing:
            raise UserError(f"trace: missing field {missing[0]!r}")
        try:
            args = dict(ep_id=int(body["ep_id"]), direction=str(body["direction"]),
                        src_ip=str(body["src_ip"]), dst_ip=str(body["dst_ip"]),
                        sport=int(body.get("sport", 0)), dport=int(body.get("dport", 0)),
                        proto=body.get("proto", 6),
                        src_identity=None if body.get("src_identity") is None
                        else int(body["src_identity"]))
        except (TypeError, ValueError) as exc:
            raise UserError(f"trace: {exc}") from None
        return web.json_response(await asyncio.to_thread(datapath().trace, **args))

    async def events_lost(_request):
        return web.json_response({"events_lost": await asyncio.to_thread(datapath().events_lost)})

    app.router.add_get("/v1/bpf/endpoints", listing("dump_endpoints"))
    app.router.add_get("/v1/bpf/ipcache", listing("dump_ipcache"))
    app.router.add_get("/v1/bpf/ct", listing("dump_ct"))
    app.router.add_get("/v1/bpf/metrics", listing("dump_metrics"))
    app.router.add_get("/v1/bpf/events-lost", events_lost)
    app.router.add_get("/v1/bpf/policy/{ep_id}", policy)
    app.router.add_post("/v1/bpf/trace", trace)
