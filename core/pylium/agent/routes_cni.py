"""`POST /v1/cni`: one `pylium-cni` invocation, run here. The query string is the `CNI_*`
environment the runtime gave the plugin (percent-encoded), the body its stdin; the answer is
what the plugin prints (one JSON line or nothing) with the exit code in the
`Pylium-CNI-Exit` header. The CNI semantics are `pylium.cni.handler`'s; the endpoint work is
the endpoint manager's, called directly (the same calls as the `/v1/endpoint` routes)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.routes_endpoint import _described, _manager
from pylium.cni import handler


class ManagerPort:
    """`handler.AgentPort` on this agent's endpoint manager."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    async def create(self, name: str, namespace: str, netns: str, container_id: str,
                     ifname: str) -> dict[str, Any]:
        ep, _created = await _manager(self.daemon).create_endpoint(
            name=name, namespace=namespace, labels=None, netns=netns,
            container_id=container_id, pod_ifname=ifname)
        return _described(self.daemon, ep)

    async def delete(self, container_id: str, ifname: str) -> None:
        await _manager(self.daemon).delete_container(container_id, ifname)

    async def check(self, container_id: str, ifname: str) -> dict[str, Any] | None:
        from pylium.endpoint.model import validate_container_id

        manager = _manager(self.daemon)
        ep = manager.find_container(validate_container_id(container_id))
        if ep is None or (ifname and ep.pod_ifname != ifname):
            return None
        problems = await manager.check(ep.container_id)
        return {"endpoint": _described(self.daemon, ep), "problems": problems}

    async def components(self) -> list[str]:
        return sorted(self.daemon.components)

    async def gc(self, valid: list[dict[str, str]]) -> dict[str, Any]:
        return await _manager(self.daemon).gc(
            {(a["container_id"], a.get("ifname") or "eth0") for a in valid})


def setup(app: web.Application, daemon: Daemon) -> None:
    port = ManagerPort(daemon)

    async def invoke(request: web.Request) -> web.Response:
        # the raw query: values are bytes the runtime chose, decoded here once
        query = request.raw_path.partition("?")[2]
        environ = {k: v for k, v in parse_qsl(query, keep_blank_values=True,
                                              errors="replace") if k.startswith("CNI_")}
        stdin = await request.read()
        code, out = await handler.run(environ, stdin, port)
        return web.Response(body=handler.output(out), content_type="application/json",
                            headers={handler.EXIT_HEADER: str(code)})

    app.router.add_post(handler.ROUTE, invoke)
