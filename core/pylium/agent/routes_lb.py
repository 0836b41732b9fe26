"""`/v1/service` (services, Cilium's shape) and `/v1/bpf/lb` (what the LB maps hold).

`PUT /v1/service/{name}` stores the service in the KV store (every node's lb component
applies it) and answers once this node's maps carry it; `DELETE` takes a name or an id."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.errors import PyliumError
from pylium.lb.model import Service


def service_json(svc: Service) -> dict[str, Any]:
    """Cilium's `cilium service list -o json` entry: `spec` and `status`."""
    fe = svc.frontend
    namespace, _, name = svc.name.rpartition("/")
    return {
        "spec": {
            "id": svc.id,
            "frontend-address": {"ip": fe.ip, "port": fe.port, "protocol": fe.protocol,
                                 "scope": "external"},
            "backend-addresses": [{"ip": b.ip, "port": b.port, "protocol": fe.protocol,
                                   "state": b.state} for b in svc.backends],
            "flags": {"type": svc.type, "trafficPolicy": svc.traffic_policy,
                      "name": name, "namespace": namespace,
                      "sessionAffinity": svc.affinity_timeout > 0,
                      "sessionAffinityTimeout": svc.affinity_timeout,
                      "nodePort": svc.node_port},
            "algorithm": svc.algorithm,
        },
        "status": {"realized": {"id": svc.id, "frontend-address": str(fe)}},
    }


def setup(app: web.Application, daemon: Daemon) -> None:
    def lb():
        component = daemon.components.get("lb")
        if component is None:
            raise PyliumError("the lb component is not running")
        return component

    def maps():
        component = lb()
        if component.maps is None:
            raise PyliumError("the lb component runs without a datapath")
        return component.maps

    async def list_services(_request):
        return web.json_response([service_json(s) for s in lb().list()])

    async def get_service(request):
        name = request.match_info["name"]
        for svc in lb().list():
            if name in (svc.name, str(svc.id)):
                return web.json_response(service_json(svc))
        raise NotFound(f"no service {name!r}")

    async def put_service(request):
        name = request.match_info["name"]
        svc = Service.from_json(name, await read_json(request))
        return web.json_response(service_json(await lb().upsert(svc)))

    async def delete_service(request):
        name = request.match_info["name"]
        removed = await lb().delete(name)
        if removed is None:
            raise NotFound(f"no service {name!r}")
        return web.json_response(service_json(removed))

    async def bpf_lb(_request):
        return web.json_response(await asyncio.to_thread(maps().dump))

    async def bpf_maglev(_request):
        component = lb()
        tables = await asyncio.to_thread(maps().dump_maglev)
        fronts = {s.id: str(s.frontend) for s in component.list()}
        out = []
        for svc_id, table in sorted(tables.items()):
            out.append({"id": svc_id, "frontend": fronts.get(svc_id), "table_size": len(table),
                        "backend_slots": dict(sorted(collections.Counter(table).items())),
                        "table": table})
        return web.json_response(out)

    async def lb_status(_request):
        return web.json_response(lb().status())

    app.router.add_get("/v1/lb", lb_status)
    app.router.add_get("/v1/service", list_services)
    app.router.add_get("/v1/service/{name:.+}", get_service)
    app.router.add_put("/v1/service/{name:.+}", put_service)
    app.router.add_delete("/v1/service/{name:.+}", delete_service)
    app.router.add_get("/v1/bpf/lb", bpf_lb)
    app.router.add_get("/v1/bpf/lb/maglev", bpf_maglev)
