"""Services + EndpointSlices → pylium services, and Nodes → NodeInfo: the translations
against API objects as the API server sends them, and the sync against a stand-in of the
agent's service API that validates with the core's own `Service` model."""

from __future__ import annotations

import asyncio
import json

import pytest
from pylium.errors import UserError
from pylium.lb.model import Service
from pylium_orchestrator_k8s.nodes import SOURCE, NodeSync, node_info
from pylium_orchestrator_k8s.services import (
    ServiceSync,
    external_ips,
    owner_of,
    slice_backends,
    translate,
)


def _svc(name="web", ns="shop", kind="ClusterIP", ip="10.96.0.10", ports=None, **spec):
    ports = ports if ports is not None else [{"port": 80, "targetPort": 8080,
                                              "protocol": "TCP"}]
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"type": kind, "clusterIP": ip, "ports": ports, **spec}}


def _slice(service="web", ns="shop", endpoints=(), ports=None, address_type="IPv4",
           name="web-abc"):
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type,
            "ports": ports if ports is not None else [{"name": "", "port": 8080,
                                                       "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], **({"conditions": c} if c is not None else {})}
                          for ip, c in endpoints]}


def test_a_clusterip_service_with_ready_endpoints():
    slices = [_slice(endpoints=[("10.0.0.2", {"ready": True}), ("10.0.0.1", None),
                                ("10.0.0.3", {"ready": False}),
                                ("10.0.0.4", {"ready": True, "terminating": True})])]
    out = translate(_svc(), slices)
    assert out == {"shop/web": {"frontend": "10.96.0.10:80/TCP",
                                "backends": ["10.0.0.1:8080", "10.0.0.2:8080"],
                                "type": "ClusterIP", "affinity_timeout": 0,
                                "traffic_policy": "Cluster"}}
    # the body is what the agent's service API takes
    svc = Service.from_json("shop/web", out["shop/web"])
    assert [b.address for b in svc.backends] == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_multi_port_nodeport_affinity_and_local_policy():
    svc = _svc(kind="NodePort", ports=[
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
        {"name": "sctp", "port": 9, "protocol": "SCTP", "nodePort": 30009}],
        externalTrafficPolicy="Local", sessionAffinity="ClientIP")
    slices = [_slice(ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                            {"name": "dns", "port": 5353, "protocol": "UDP"}],
                     endpoints=[("10.0.0.5", None)]),
              _slice(name="web-v6", address_type="IPv6", endpoints=[("fd00::5", None)])]
    out = translate(svc, slices)
    assert sorted(out) == ["shop/web.dns", "shop/web.http"]
    assert out["shop/web.http"]["backends"] == ["10.0.0.5:8080"]
    assert out["shop/web.dns"] == {"frontend": "10.96.0.10:53/UDP",
                                   "backends": ["10.0.0.5:5353"], "type": "NodePort",
                                   "node_port": 30053, "affinity_timeout": 10800,
                                   "traffic_policy": "Local"}
    for name, body in out.items():
        Service.from_json(name, body)
        assert owner_of(name) == ("shop", "web")


def test_services_without_a_frontend_are_left_out():
    assert translate(_svc(ip="None"), []) == {}
    assert translate(_svc(kind="ExternalName", ip=""), []) == {}
    assert translate(_svc(ip="fd00::10"), []) == {}
    # a LoadBalancer service is a NodePort one here; no ready endpoint: no backend
    out = translate(_svc(kind="LoadBalancer", ports=[{"port": 443, "nodePort": 31443}]), [])
    assert out["shop/web"]["type"] == "NodePort" and out["shop/web"]["backends"] == []


def test_external_ips_and_load_balancer_ingress_are_extra_frontends():
    svc = _svc(kind="LoadBalancer", ports=[
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
        externalIPs=["192.0.2.10", "fd00::1", "10.96.0.10", "192.0.2.10"],
        externalTrafficPolicy="Local", sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    svc["status"] = {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.7"}, {"hostname": "lb.example.com"}, {"ip": "192.0.2.10"}]}}
    assert external_ips(svc) == [("external", "192.0.2.10"), ("lb", "198.51.100.7")]
    slices = [_slice(ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                            {"name": "dns", "port": 5353, "protocol": "UDP"}],
                     endpoints=[("10.0.0.5", None), ("10.0.0.6", None)])]
    out = translate(svc, slices)
    assert sorted(out) == [
        "shop/web.dns", "shop/web.dns.external.192.0.2.10", "shop/web.dns.lb.198.51.100.7",
        "shop/web.http", "shop/web.http.external.192.0.2.10",
        "shop/web.http.lb.198.51.100.7"]
    assert out["shop/web.http.external.192.0.2.10"] == {
        "frontend": "192.0.2.10:80/TCP", "backends": ["10.0.0.5:8080", "10.0.0.6:8080"],
        "type": "ExternalIPs", "affinity_timeout": 60, "traffic_policy": "Cluster"}
    assert out["shop/web.dns.lb.198.51.100.7"]["frontend"] == "198.51.100.7:53/UDP"
    assert out["shop/web.dns.lb.198.51.100.7"]["type"] == "LoadBalancer"
    # the core accepts both types (served like a ClusterIP frontend)
    for key in ("shop/web.http.external.192.0.2.10", "shop/web.dns.lb.198.51.100.7"):
        assert Service.from_json(key, out[key]).type == out[key]["type"]
    assert out["shop/web.dns.lb.198.51.100.7"]["backends"] == ["10.0.0.5:5353",
                                                                "10.0.0.6:5353"]
    # the node port stays with the ClusterIP frontend, with its Local policy
    assert out["shop/web.http"]["node_port"] == 30080
    assert out["shop/web.http"]["traffic_policy"] == "Local"
    for name, body in out.items():
        Service.from_json(name, body)  # what the agent's service API takes
        assert owner_of(name) == ("shop", "web")
    # one port: the external frontend's name has one part before the kind
    one = translate(_svc(externalIPs=["192.0.2.10"]), [])
    assert sorted(one) == ["shop/web", "shop/web.external.192.0.2.10"]
    assert one["shop/web.external.192.0.2.10"]["frontend"] == "192.0.2.10:80/TCP"
    # nothing to add: no ingress yet, an IPv6-only one, junk
    assert external_ips(_svc()) == []
    bad = _svc(externalIPs=["not-an-ip", None])
    bad["status"] = {"loadBalancer": {"ingress": [{"ip": "fd00::7"}, "junk"]}}
    assert external_ips(bad) == [] and sorted(translate(bad, [])) == ["shop/web"]
    # a headless Service gets no external frontend either
    assert translate(_svc(ip="None", externalIPs=["192.0.2.10"]), []) == {}


def test_sync_adds_and_removes_external_frontends(tmp_path):
    api = FakeServiceAPI()
    sync = ServiceSync(api, tmp_path)
    slices = [_slice(endpoints=[("10.0.0.1", None)])]
    with_ip = _svc(externalIPs=["192.0.2.10"])

    async def run():
        await sync.resync(translate(_svc(), slices))
        assert sorted(api.stored) == ["shop/web"]
        await sync.sync("shop", "web", with_ip, slices)   # externalIPs added
        assert sorted(api.stored) == ["shop/web", "shop/web.external.192.0.2.10"]
        assert str(api.stored["shop/web.external.192.0.2.10"].frontend) == "192.0.2.10:80/TCP"
        await sync.sync("shop", "web", with_ip, [])       # no ready backend left
        assert api.stored["shop/web.external.192.0.2.10"].backends == ()
        await sync.sync("shop", "web", _svc(), slices)    # externalIPs removed
        assert sorted(api.stored) == ["shop/web"]
        await sync.sync("shop", "web", with_ip, slices)
        await sync.sync("shop", "web", None, [])          # the Service deleted: all of it
        assert api.stored == {}

    asyncio.run(run())


def test_slice_ports_are_matched_by_name_and_protocol():
    sl = [_slice(ports=[{"name": "a", "port": 1, "protocol": "TCP"},
                        {"name": "a", "port": 2, "protocol": "UDP"}],
                 endpoints=[("10.0.0.9", None)])]
    assert slice_backends("a", "UDP", sl) == ["10.0.0.9:2"]
    assert slice_backends("b", "TCP", sl) == []


class FakeServiceAPI:
    """The agent's service API as the orchestrator sees it (`context.services`)."""

    def __init__(self):
        self.stored: dict[str, Service] = {}
        self.calls: list[tuple[str, str]] = []

    async def upsert(self, svc: Service) -> Service:
        for other in self.stored.values():
            if other.name != svc.name and other.frontend == svc.frontend:
                raise UserError(f"frontend {svc.frontend} is already service {other.name}")
        self.calls.append(("upsert", svc.name))
        self.stored[svc.name] = svc
        return svc

    async def delete(self, name: str):
        self.calls.append(("delete", name))
        return self.stored.pop(name, None)


def test_sync_follows_scaling_and_deletion_and_remembers_what_it_wrote(tmp_path):
    api = FakeServiceAPI()
    api.stored["by-hand"] = Service.from_json("by-hand", {"frontend": "10.96.0.99:80"})
    sync = ServiceSync(api, tmp_path)
    two = [_slice(endpoints=[("10.0.0.1", None), ("10.0.0.2", None)])]
    one = [_slice(endpoints=[("10.0.0.1", None)])]

    async def run():
        await sync.resync({**translate(_svc(), two), **translate(_svc(name="db"), [])})
        assert [b.address for b in api.stored["shop/web"].backends] == ["10.0.0.1:8080",
                                                                        "10.0.0.2:8080"]
        await sync.sync("shop", "web", _svc(), one)  # scaled down
        assert [b.address for b in api.stored["shop/web"].backends] == ["10.0.0.1:8080"]
        calls = len(api.calls)
        await sync.sync("shop", "web", _svc(), one)  # nothing changed: nothing written
        assert len(api.calls) == calls
        await sync.sync("shop", "web", None, one)    # the Service was deleted
        assert "shop/web" not in api.stored and "by-hand" in api.stored

        # db had web's address (a stale Service copy, say): refused until web was gone
        assert "shop/db" in api.stored and not sync.status()["errors"]

    asyncio.run(run())
    assert json.loads((tmp_path / "services.json").read_text()).keys() == {"shop/db"}

    # a restarted agent: the Service db went away meanwhile; the hand-made one stays
    again = ServiceSync(api, tmp_path)
    asyncio.run(again.resync({}))
    assert sorted(api.stored) == ["by-hand"]


def test_a_clash_is_reported_and_retried_not_fatal(tmp_path):
    api = FakeServiceAPI()
    api.stored["by-hand"] = Service.from_json("by-hand", {"frontend": "10.96.0.10:80"})
    sync = ServiceSync(api, None)
    asyncio.run(sync.sync("shop", "web", _svc(), []))
    assert "already service by-hand" in sync.status()["errors"]["shop/web"]
    del api.stored["by-hand"]
    asyncio.run(sync.sync("shop", "web", _svc(), []))  # same body, but it failed before
    assert "shop/web" in api.stored and not sync.status()["errors"]


def _node(name="n1", addresses=(("InternalIP", "192.168.1.5"),), pod_cidr="10.1.5.0/24",
          ready="True", labels=None):
    return {"metadata": {"name": name, "labels": labels or {"kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": pod_cidr} if pod_cidr else {},
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses],
                       "conditions": [{"type": "Ready", "status": ready}]}}


def test_node_objects_become_node_infos():
    info, why, extra = node_info(_node(addresses=(("Hostname", "n1"),
                                                  ("ExternalIP", "203.0.113.5"),
                                                  ("InternalIP", "192.168.1.5"))))
    assert why == "" and str(info.ipv4) == "192.168.1.5"  # InternalIP first
    assert str(info.pod_cidr) == "10.1.5.0/24" and info.labels == {"kubernetes.io/os": "linux"}
    assert extra["ready"] is True and "Hostname=n1" in extra["addresses"]
    assert node_info(_node(pod_cidr=None))[1] == "no IPv4 spec.podCIDR"
    assert node_info(_node(addresses=(("InternalIP", "fd00::5"),)))[1].startswith("no IPv4")


class FakeRegistry:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def set_external(self, source, node, **extra):
        assert source == SOURCE
        self.nodes[node.name] = {"node": node, **extra}

    def remove_external(self, source, name):
        self.nodes.pop(name, None)

    def external(self, source):
        return {k: v["node"] for k, v in self.nodes.items()}


def test_node_sync_adds_updates_waits_and_removes():
    reg = FakeRegistry()
    sync = NodeSync(reg)
    sync.on_node("ADDED", _node(pod_cidr=None))
    assert reg.nodes == {} and sync.status()["waiting"] == {"n1": "no IPv4 spec.podCIDR"}
    sync.on_node("MODIFIED", _node())
    assert str(reg.nodes["n1"]["node"].pod_cidr) == "10.1.5.0/24"
    assert sync.status() == {"nodes": ["n1"], "waiting": {}}
    sync.on_node("DELETED", _node())
    assert reg.nodes == {}


@pytest.mark.parametrize("bad", [{"metadata": {}}, {}])
def test_node_sync_ignores_nameless_objects(bad):
    sync = NodeSync(FakeRegistry())
    sync.on_node("ADDED", bad)
    assert sync.status() == {"nodes": [], "waiting": {}}
