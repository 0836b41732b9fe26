"""`policy import --dry-run` arithmetic: per endpoint, the policy-map entries the planned
policies would need (computed by the engine on copies) against the map's capacity."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer
from pylium.agent.server import make_app
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity
from pylium.policy.capacity import overflow_message, plan_import
from pylium.policy.load import load_text


def _ports_policy(name: str, app: str, ports: range) -> str:
    listed = ", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  endpointSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n"
            f"  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n"
            f"    toPorts: [{{ports: [{listed}]}}]\n")


def _cache() -> IdentityCache:
    return IdentityCache([Identity(300, LabelSet.parse("app=web,io.kubernetes.pod.namespace=default")),
                          Identity(301, LabelSet.parse("app=db,io.kubernetes.pod.namespace=default")),
                          Identity(302, LabelSet.parse("app=client,io.kubernetes.pod.namespace=default"))])


def test_plan_counts_entries_per_endpoint_and_names_the_overflowing_ones():
    cache = _cache()
    current = load_text(_ports_policy("web", "web", range(80, 83)))
    endpoints = [(1, "default/web-1", 300), (2, "default/db-1", 301), (3, "default/new", 999)]
    fits = plan_import(load_text(_ports_policy("db", "db", range(5000, 5010))), current,
                       cache, "default", endpoints, capacity=8)
    got = {f.name: (f.entries, f.fits) for f in fits}
    # web: 3 port entries + meta; db: 10 + meta > 8; an identity not known yet: left out
    assert got == {"default/web-1": (4, True), "default/db-1": (11, False)}
    assert overflow_message(fits) == (
        "refused: the policy map of 1 endpoint(s) would overflow its 8 entries: "
        "default/db-1 (endpoint 2: 11 entries); nothing was imported")
    # replacing a same-named policy counts the new one, not both
    smaller = plan_import(load_text(_ports_policy("web", "web", range(80, 81))), current,
                          cache, "default", endpoints[:1], capacity=8)
    assert [f.entries for f in smaller] == [2]
    assert overflow_message(smaller) is None


def test_plan_creates_no_cidr_identity_in_the_agent_cache():
    cache = _cache()
    before = len(cache)
    cidr = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: web}}\n"
            "  egress: [{toCIDR: [192.0.2.0/24, 198.51.100.7/32]}]\n")
    fits = plan_import(load_text(cidr), [], cache, "default", [(1, "default/web", 300)], 100)
    assert fits[0].entries >= 3 and len(cache) == before


def test_api_dry_run_imports_nothing(tmp_path, start_daemon):
    text = _ports_policy("web", "web", range(80, 83))

    async def go():
        daemon = await start_daemon(tmp_path)
        async with TestClient(TestServer(make_app(daemon))) as client:
            resp = await client.post("/v1/policy?dry_run=true", json={"text": text})
            answer = await resp.json()
            assert resp.status == 200, answer
            assert answer["dry_run"] is True and answer["refused"] is None
            assert [p["name"] for p in answer["would_import"]] == ["web"]
            assert answer["endpoints"] == []  # no endpoint manager in this agent
            listing = await (await client.get("/v1/policy")).json()
            assert listing["policies"] == [] and listing["revision"] == 0
        await daemon.stop()

    asyncio.run(go())
