"""Endpoints: `PUT/GET/PATCH/DELETE /v1/endpoint/{id-or-name}`, `GET /v1/endpoint`, and
`GET /v1/endpoint-regeneration` (`busy` until a policy change reached every endpoint)."""

from __future__ import annotations

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.errors import PyliumError, UserError


def _manager(daemon: Daemon):
    manager = daemon.components.get("endpoint")
    if manager is None:
        raise PyliumError("the endpoint manager is not running in this agent")
    return manager


def _get(daemon: Daemon, ref: str):
    from pylium.endpoint.manager import EndpointNotFound

    try:
        return _manager(daemon).get(ref)
    except EndpointNotFound as exc:
        raise NotFound(str(exc)) from None


def setup(app: web.Application, daemon: Daemon) -> None:
    async def list_endpoints(_request):
        return web.json_response([ep.to_api() for ep in _manager(daemon).list()])

    async def get_endpoint(request):
        return web.json_response(_get(daemon, request.match_info["ref"]).to_api())

    async def put_endpoint(request):
        body = await read_json(request)
        unknown = sorted(set(body) - {"namespace", "labels", "netns"})
        if unknown:
            raise UserError(f"{unknown[0]}: unknown field (known: namespace, labels, netns)")
        ep = await _manager(daemon).create(
            name=request.match_info["ref"], namespace=body.get("namespace", "default"),
            labels=body.get("labels"), netns=body.get("netns"))
        return web.json_response(ep.to_api(), status=201)

    async def patch_endpoint(request):
        body = await read_json(request)
        unknown = sorted(set(body) - {"labels"})
        if unknown or "labels" not in body:
            raise UserError(f"{unknown[0] if unknown else 'labels'}: only `labels` can be "
                            "changed on an existing endpoint")
        ep = _get(daemon, request.match_info["ref"])
        ep = await _manager(daemon).set_labels(ep.id, body["labels"])
        return web.json_response(ep.to_api())

    async def delete_endpoint(request):
        ep = _get(daemon, request.match_info["ref"])
        ep = await _manager(daemon).delete(ep.id)
        return web.json_response({"deleted": ep.id, "name": ep.name})

    async def regeneration(_request):
        return web.json_response(_manager(daemon).regeneration_status())

    app.router.add_get("/v1/endpoint", list_endpoints)
    app.router.add_get("/v1/endpoint-regeneration", regeneration)
    app.router.add_get("/v1/endpoint/{ref}", get_endpoint)
    app.router.add_put("/v1/endpoint/{ref}", put_endpoint)
    app.router.add_patch("/v1/endpoint/{ref}", patch_endpoint)
    app.router.add_delete("/v1/endpoint/{ref}", delete_endpoint)
