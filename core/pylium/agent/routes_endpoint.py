"""Endpoints: `PUT/GET/PATCH/DELETE /v1/endpoint/{id-or-name}`, `GET /v1/endpoint`
(`?container_id=` filters), `GET /v1/endpoint-regeneration` (`busy` until a policy change
reached every endpoint), and what the CNI plugin asks for by container id:
`GET/DELETE /v1/endpoint/container/{id}` (the delete is idempotent),
`GET /v1/endpoint/container/{id}/check` and `POST /v1/endpoint-gc`.

One create for the lab and the CNI plugin: `PUT /v1/endpoint/{name}` with the pod's
`netns`, and for CNI its `container_id` and `ifname`; a repeated PUT for the same container
answers 200 with the endpoint made the first time (201 when it made one)."""

from __future__ import annotations

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.errors import PyliumError, UserError

CREATE_FIELDS = ("namespace", "labels", "netns", "container_id", "ifname")


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


def _container(daemon: Daemon, request: web.Request):
    from pylium.endpoint.model import validate_container_id

    cid = validate_container_id(request.match_info["cid"])
    ep = _manager(daemon).find_container(cid)
    ifname = request.query.get("ifname", "")
    if ep is None or (ifname and ep.pod_ifname != ifname):
        raise NotFound(f"container {cid} has no endpoint"
                       + (f" with interface {ifname}" if ifname else ""))
    return ep


def _described(daemon: Daemon, ep) -> dict:
    """An endpoint as the API shows it, with the pods' gateway (what CNI results carry)."""
    return {**ep.to_api(), "gateway": str(_manager(daemon).ipam.gateway)}


def setup(app: web.Application, daemon: Daemon) -> None:
    async def list_endpoints(request):
        endpoints = _manager(daemon).list()
        if "container_id" in request.query:
            endpoints = [ep for ep in endpoints
                         if ep.container_id == request.query["container_id"]]
        return web.json_response([ep.to_api() for ep in endpoints])

    async def get_endpoint(request):
        return web.json_response(_get(daemon, request.match_info["ref"]).to_api())

    async def put_endpoint(request):
        body = await read_json(request)
        unknown = sorted(set(body) - set(CREATE_FIELDS))
        if unknown:
            raise UserError(f"{unknown[0]}: unknown field (known: {', '.join(CREATE_FIELDS)})")
        ep, created = await _manager(daemon).create_endpoint(
            name=request.match_info["ref"], namespace=body.get("namespace", "default"),
            labels=body.get("labels"), netns=body.get("netns"),
            container_id=body.get("container_id") or "", pod_ifname=body.get("ifname", "eth0"))
        return web.json_response(_described(daemon, ep), status=201 if created else 200)

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

    async def get_container(request):
        return web.json_response(_described(daemon, _container(daemon, request)))

    async def delete_container(request):
        ep = await _manager(daemon).delete_container(request.match_info["cid"],
                                                     request.query.get("ifname", ""))
        return web.json_response({"deleted": ep.id if ep else None,
                                  "name": ep.name if ep else None})

    async def check_container(request):
        ep = _container(daemon, request)
        problems = await _manager(daemon).check(ep.container_id)
        return web.json_response({"endpoint": _described(daemon, ep), "problems": problems})

    async def gc(request):
        body = await read_json(request)
        valid = body.get("valid")
        if not isinstance(valid, list) or not all(
                isinstance(a, dict) and isinstance(a.get("container_id"), str)
                and isinstance(a.get("ifname", ""), str) for a in valid):
            raise UserError("valid: expected a list of {container_id, ifname} objects")
        return web.json_response(await _manager(daemon).gc(
            {(a["container_id"], a.get("ifname") or "eth0") for a in valid}))

    async def regeneration(_request):
        return web.json_response(_manager(daemon).regeneration_status())

    app.router.add_get("/v1/endpoint", list_endpoints)
    app.router.add_get("/v1/endpoint-regeneration", regeneration)
    app.router.add_post("/v1/endpoint-gc", gc)
    app.router.add_get("/v1/endpoint/container/{cid}", get_container)
    app.router.add_delete("/v1/endpoint/container/{cid}", delete_container)
    app.router.add_get("/v1/endpoint/container/{cid}/check", check_container)
    app.router.add_get("/v1/endpoint/{ref}", get_endpoint)
    app.router.add_put("/v1/endpoint/{ref}", put_endpoint)
    app.router.add_patch("/v1/endpoint/{ref}", patch_endpoint)
    app.router.add_delete("/v1/endpoint/{ref}", delete_endpoint)
