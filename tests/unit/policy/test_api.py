"""The agent API for policies and identities (real routes, real embedded KV store), and
that imported policies survive an agent restart."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer
from pylium.agent.server import make_app
from pylium.identity.labels import LabelSet


def test_import_get_trace_delete_and_restart(tmp_path, example_policies, start_daemon):
    rule1 = (example_policies / "l3-l4-rule1.yaml").read_text()

    async def go():
        daemon = await start_daemon(tmp_path)
        async with TestClient(TestServer(make_app(daemon))) as client:
            resp = await client.post("/v1/policy", json={"text": rule1, "name": "rule1"})
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["imported"][0]["name"] == "rule1"
            bad = await client.post("/v1/policy", json={"text": "kind: Pod\n"})
            assert bad.status == 400 and "kind" in (await bad.json())["error"]
            listing = await (await client.get("/v1/policy")).json()
            assert [p["name"] for p in listing["policies"]] == ["rule1"]
            assert (await client.get("/v1/policy/default/rule1")).status == 200
            assert (await client.get("/v1/policy/nope")).status == 404
            traced = await (await client.post("/v1/policy/trace", json={
                "src": "org=empire,class=tiefighter", "dst": "org=empire,class=deathstar",
                "dport": 80})).json()
            assert traced["verdict"] == "allowed"
            # an endpoint identity allocated through the manager appears in the listing
            manager = daemon.components["identity"]
            web = await manager.allocate(LabelSet.parse("app=web"))
            ids = await (await client.get("/v1/identity")).json()
            assert {"id": web.id, "labels": ["k8s:app=web"]} in ids
            assert {"id": 1, "labels": ["reserved:host"]} in ids
            assert (await client.get(f"/v1/identity/{web.id}")).status == 200
            assert (await client.get("/v1/identity/99999")).status == 404
        await daemon.stop()

        again = await start_daemon(tmp_path)
        async with TestClient(TestServer(make_app(again))) as client:
            listing = await (await client.get("/v1/policy")).json()
            assert [p["name"] for p in listing["policies"]] == ["rule1"]
            assert again.components["identity"].lookup(web.id).labels == web.labels
            gone = await (await client.delete("/v1/policy?name=rule1")).json()
            assert [p["name"] for p in gone["deleted"]] == ["rule1"]
            assert (await client.delete("/v1/policy?name=rule1")).status == 404
        await again.stop()

    asyncio.run(go())


def test_import_answer_carries_warnings_for_fields_not_enforced(tmp_path, start_daemon):
    fqdn = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fq}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n"
            "  - toServices: [{k8sService: {serviceName: db, namespace: prod}}]\n"
            "  - toFQDNs: [{matchName: api.example.com}]\n")
    plain = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: plain}\n"
             "spec:\n  endpointSelector: {}\n  egress: [{toEndpoints: [{}]}]\n")

    async def go():
        daemon = await start_daemon(tmp_path)
        async with TestClient(TestServer(make_app(daemon))) as client:
            resp = await client.post("/v1/policy", json={"text": fqdn})
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            assert [p["name"] for p in answer["imported"]] == ["fq"]
            assert [w["path"] for w in answer["warnings"]] == [
                "spec.egress[0].toServices", "spec.egress[1].toFQDNs"]
            assert all(w["message"].startswith("not enforced yet by pylium")
                       and "traffic it would allow is denied" in w["message"]
                       for w in answer["warnings"])
            clean = await (await client.post("/v1/policy", json={"text": plain})).json()
            assert clean["warnings"] == []
            # the rule is in force as written: what toFQDNs/toServices would allow is denied
            traced = await (await client.post("/v1/policy/trace", json={
                "src": "app=web", "dst_cidr": "192.0.2.1",
                "dport": 443})).json()
            assert traced["verdict"] == "denied"
        await daemon.stop()

    asyncio.run(go())
