"""Cluster API: nodes, the ipcache against the store, cluster-wide identities.

    GET  /v1/cluster                 → session + sync status
    GET  /v1/cluster/nodes           → [node] (this node included, `local: true`)
    GET  /v1/cluster/ipcache         → {"store", "ipcache", "missing", "stale", "different",
                                        "entries": [...]}: this node's remote ipcache
                                        entries compared with the store right now
    GET  /v1/cluster/identities      → [{"id", "labels", "references": [node]}] from the store
    POST /v1/cluster/identities      {"labels": ["k=v", ...]} → allocate (what endpoint
                                        creation does; this node references it until released)
    DELETE /v1/cluster/identities/{id} → release this node's reference
    POST /v1/cluster/identities/gc   → one garbage-collection pass now
"""

from __future__ import annotations

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import read_json
from pylium.errors import PyliumError, UserError


def setup(app: web.Application, daemon: Daemon) -> None:
    def cluster():
        component = daemon.components.get("cluster")
        if component is None:
            raise PyliumError("the cluster component is not running")
        return component

    def identities():
        manager = daemon.components.get("identity")
        if manager is None:
            raise PyliumError("the identity manager is not running")
        return manager

    async def status(_request):
        return web.json_response(cluster().status())

    async def nodes(_request):
        return web.json_response(cluster().nodes.list())

    async def ipcache(_request):
        sync = cluster().ipcache
        report = await sync.compare_with_store()
        report["entries"] = [{"ip": ip, "identity": identity, "tunnel_endpoint": tunnel,
                              "node": sync.remote.get(ip, (0, "", ""))[1]}
                             for ip, (identity, tunnel) in sorted(sync.installed.items())]
        return web.json_response(report)

    async def list_identities(_request):
        allocator = identities().allocator
        refs = await allocator.all_references()
        return web.json_response([{**i.to_dict(), "references": sorted(refs.get(i.id, []))}
                                  for i in await allocator.list()])

    async def allocate(request):
        from pylium.identity.labels import LabelSet

        body = await read_json(request)
        labels = body.get("labels")
        if not isinstance(labels, list) or not labels or \
                not all(isinstance(x, str) for x in labels):
            raise UserError("labels: give a non-empty list of \"key=value\" strings")
        try:
            label_set = LabelSet.parse(labels)
        except ValueError as exc:
            raise UserError(f"labels: {exc}") from None
        identity = await identities().allocate(label_set)
        return web.json_response(identity.to_dict())

    async def release(request):
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise UserError(f"{raw!r} is not an identity number")
        await identities().release(int(raw))
        return web.json_response({"released": int(raw)})

    async def collect(_request):
        gc = cluster().gc
        if gc is None:
            raise PyliumError("no identity allocator in this agent")
        deleted = await gc.run_once()
        return web.json_response({"deleted": deleted, "marked": sorted(gc.marked)})

    app.router.add_get("/v1/cluster", status)
    app.router.add_get("/v1/cluster/nodes", nodes)
    app.router.add_get("/v1/cluster/ipcache", ipcache)
    app.router.add_get("/v1/cluster/identities", list_identities)
    app.router.add_post("/v1/cluster/identities", allocate)
    app.router.add_post("/v1/cluster/identities/gc", collect)
    app.router.add_delete("/v1/cluster/identities/{id}", release)
