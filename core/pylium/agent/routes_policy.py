"""Policy API: import, list, delete, trace.

    GET    /v1/policy                      → {"revision", "policies": [...]}
    GET    /v1/policy/{name}               → the policy (namespace/name or name)
    POST   /v1/policy      {"text", "name"} → import YAML/JSON text; {"revision", "imported",
           "warnings": [{"path", "message"}]} (accepted but not enforced yet, e.g. toFQDNs);
           refused (400, naming them) when an endpoint's policy map could not hold the result
    POST   /v1/policy?dry_run=true → nothing imported; {"dry_run", "would_import",
           "endpoints": [{"endpoint_id", "name", "identity", "entries", "capacity", "fits"}],
           "refused": the refusal line or null, "warnings"}
    DELETE /v1/policy?name=N[&namespace=NS] | ?labels=k=v,.. | ?all=true
    POST   /v1/policy/trace {TraceQuery fields, "datapath": bool} → the trace result (with
           the loaded BPF programs' answer under "datapath" when asked)
"""

from __future__ import annotations

import logging

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound, read_json
from pylium.agent.trace_datapath import datapath_trace
from pylium.datapath.maps.policy import POLICY_ENTRIES_MAX
from pylium.errors import PyliumError, UserError
from pylium.policy.capacity import EndpointFit, overflow_message, plan_import
from pylium.policy.load import load_text
from pylium.policy.rule import Policy
from pylium.policy.trace import TraceQuery, trace

log = logging.getLogger(__name__)


def policy_summary(p: Policy, with_source: bool = False) -> dict:
    out = {"kind": p.kind, "namespace": p.namespace, "name": p.name, "rules": len(p.rules),
           "description": p.description}
    if with_source:
        out["source"] = p.source
    return out


def setup(app: web.Application, daemon: Daemon) -> None:
    def service():
        svc = daemon.components.get("policy")
        if svc is None:
            raise PyliumError("the policy engine is not running")
        return svc

    async def list_policies(request):
        svc = service()
        full = request.query.get("source") in ("1", "true")
        return web.json_response({
            "revision": svc.repository.revision,
            "policies": [policy_summary(p, full) for p in svc.repository.policies()]})

    async def get_policy(request):
        svc = service()
        name = request.match_info["name"]
        found = svc.repository.find(name, request.query.get("namespace"))
        if not found:
            raise NotFound(f"no policy named {name!r}")
        return web.json_response({"revision": svc.repository.revision,
                                  "policies": [policy_summary(p, True) for p in found]})

    def capacity_plan(svc, policies: list[Policy]) -> list[EndpointFit]:
        """What each local endpoint's policy map would need with `policies` imported."""
        manager = daemon.components.get("endpoint")
        datapath = daemon.components.get("datapath")
        endpoints = [(ep.id, f"{ep.namespace}/{ep.name}", ep.identity)
                     for ep in (manager.list() if manager is not None else [])
                     if getattr(ep, "identity", 0)]
        return plan_import(policies, svc.repository.policies(), svc.engine.identities,
                           svc.engine.mode, endpoints,
                           getattr(datapath, "policy_capacity", POLICY_ENTRIES_MAX))

    async def import_policy(request):
        svc = service()
        body = await read_json(request)
        text = body.get("text")
        if not isinstance(text, str):
            raise UserError("request needs \"text\": the policy YAML or JSON")
        policies = load_text(text, str(body.get("name") or "rules"))
        fits = capacity_plan(svc, policies)
        refused = overflow_message(fits)
        if request.query.get("dry_run") in ("1", "true"):
            return web.json_response({
                "dry_run": True, "would_import": [policy_summary(p) for p in policies],
                "endpoints": [f.to_dict() for f in fits], "refused": refused,
                "warnings": [w.to_dict() for p in policies for w in p.warnings]})
        if refused:
            log.error("policy import %s", refused)
            raise UserError(refused)
        revision = await svc.store.add(policies)
        warnings = [(p, w) for p in policies for w in p.warnings]
        for p, w in warnings:
            log.warning("policy %s: %s", p.ref, w)
        return web.json_response({"revision": revision,
                                  "imported": [policy_summary(p) for p in policies],
                                  "warnings": [w.to_dict() for _, w in warnings]})

    async def delete_policy(request):
        svc = service()
        q = request.query
        if q.get("all") in ("1", "true"):
            gone = await svc.store.delete_all()
        elif q.get("labels"):
            gone = await svc.store.delete_by_labels(q["labels"].split(","))
        elif q.get("name"):
            try:
                gone = await svc.store.delete(q["name"], q.get("namespace"))
            except UserError as exc:
                raise NotFound(str(exc)) from None
        else:
            raise UserError("say which policy: name=, labels= or all=true")
        return web.json_response({"revision": svc.repository.revision,
                                  "deleted": [policy_summary(p) for p in gone]})

    async def trace_policy(request):
        svc = service()
        body = await read_json(request)
        ask_datapath = bool(body.pop("datapath", False))
        query = TraceQuery.from_dict(body)
        result = trace(query, svc.repository.policies(), svc.engine.identities.all(),
                       svc.engine.mode)
        out = result.to_dict()
        if ask_datapath:
            out["datapath"] = await datapath_trace(daemon, result)
        return web.json_response(out)

    app.router.add_get("/v1/policy", list_policies)
    app.router.add_post("/v1/policy", import_policy)
    app.router.add_delete("/v1/policy", delete_policy)
    app.router.add_post("/v1/policy/trace", trace_policy)
    app.router.add_get("/v1/policy/{name:.+}", get_policy)
