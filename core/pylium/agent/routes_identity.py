"""Identity API.

    GET /v1/identity        → [{"id", "labels"}] (reserved, allocated, CIDR)
    GET /v1/identity/{id}   → {"id", "labels"}
    GET /v1/identity/references → {"<id>": local users} (endpoints holding each identity;
                              a leak check: back to its baseline after endpoints are gone)
"""

from __future__ import annotations

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound
from pylium.errors import PyliumError, UserError


def setup(app: web.Application, daemon: Daemon) -> None:
    def manager():
        mgr = daemon.components.get("identity")
        if mgr is None:
            raise PyliumError("the identity manager is not running")
        return mgr

    async def list_identities(_request):
        return web.json_response([i.to_dict() for i in manager().list()])

    async def get_identity(request):
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise UserError(f"{raw!r} is not an identity number")
        identity = manager().lookup(int(raw))
        if identity is None:
            raise NotFound(f"identity {raw} is not known")
        return web.json_response(identity.to_dict())

    async def references(_request):
        return web.json_response({str(n): c for n, c in sorted(manager().references().items())})

    app.router.add_get("/v1/identity", list_identities)
    app.router.add_get("/v1/identity/references", references)
    app.router.add_get("/v1/identity/{id}", get_identity)
