"""`/v1/routing`: the routing mode's state, and static node / remote-endpoint entries.

`PUT /v1/routing/nodes/{name}` tells the routing mode about a node by hand (what the
cluster's node registry does from the KV store); `PUT /v1/routing/ipcache` puts a remote
pod's `/32 → identity, tunnel endpoint` into this node's ipcache. The lab uses both when the
agents run without a node registry."""

from __future__ import annotations

import asyncio

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.api.routing import NodeInfo
from pylium.errors import PyliumError, UserError


def setup(app: web.Application, daemon: Daemon) -> None:
    def routing():
        component = daemon.components.get("routing")
        if component is None:
            raise PyliumError("the routing component is not running")
        return component

    async def status(_request):
        return web.json_response(routing().status())

    async def put_node(request):
        name = request.match_info["name"]
        body = await read_json(request)
        try:
            node = NodeInfo(name=name, ipv4=body["ipv4"], pod_cidr=body["pod_cidr"])
        except KeyError as exc:
            raise UserError(f"node {name}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise UserError(f"node {name}: {exc}") from None
        await asyncio.to_thread(daemon.capabilities.node_joined, node, True)
        return web.json_response(routing().status())

    async def delete_node(request):
        name = request.match_info["name"]
        node = routing().nodes.get(name)
        if node is None:
            raise NotFound(f"no node {name!r} known to the routing mode")
        await asyncio.to_thread(daemon.capabilities.node_left, node, True)
        return web.json_response(routing().status())

    async def put_ipcache(request):
        body = await read_json(request)
        datapath = daemon.components.get("datapath")
        if datapath is None:
            raise PyliumError("the datapath component is not running")
        try:
            cidr, identity = str(body["cidr"]), int(body["identity"])
        except KeyError as exc:
            raise UserError(f"ipcache: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"ipcache: identity: {exc}") from None
        await asyncio.to_thread(datapath.upsert_ipcache, cidr, identity,
                                body.get("tunnel_endpoint"))
        return web.json_response({"cidr": cidr, "identity": identity,
                                  "tunnel_endpoint": body.get("tunnel_endpoint")})

    app.router.add_get("/v1/routing", status)
    app.router.add_put("/v1/routing/nodes/{name}", put_node)
    app.router.add_delete("/v1/routing/nodes/{name}", delete_node)
    app.router.add_put("/v1/routing/ipcache", put_ipcache)
