"""Endpoints through the agent API: real veths, routes and IPs; nothing leaks on delete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pylium.datapath import netns as plumbing
from pylium.errors import UserError

from .eplab import api, ping


def _lxc_links(lab) -> set[str]:
    return {link.ifname for link in plumbing.list_links(lab.node()["netns"])
            if link.ifname.startswith("lxc")}


def _ipam(lab) -> dict:
    path = f"{lab.node()['state_dir']}/ipam.json"
    return json.load(open(path))["allocated"]


def test_create_wires_the_pod_like_cilium(fresh_lab):
    pod = fresh_lab.add_pod("web", {"app": "web"})
    ep = api(fresh_lab).get("/v1/endpoint/web")
    node_ns = fresh_lab.node()["netns"]
    assert ep["ipv4"] == pod["ip"] and ep["ipv4"].startswith("10.200.1.")
    assert ep["ipv4"] not in ("10.200.1.0", "10.200.1.1", "10.200.1.255")
    assert 1 <= ep["id"] <= 4095 and ep["identity"] >= 256 and ep["state"] == "ready"
    assert ep["identity_labels"] == ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]
    # pod side: /32 on eth0, default via the gateway onlink, gateway -> host veth MAC
    assert plumbing.addresses("eth0", pod["netns"]) == [f"{ep['ipv4']}/32"]
    assert {"dst": "default", "gateway": "10.200.1.1"}.items() <= \
        plumbing.routes(pod["netns"])[0].items()
    assert plumbing.neighbours("eth0", pod["netns"]) == {"10.200.1.1": ep["mac"]}
    # node side: the lxc veth, a /32 route through it, a static neighbour for the pod
    host = plumbing.link_info(ep["ifname"], node_ns)
    assert host is not None and host.ifindex == ep["ifindex"] and host.mac == ep["mac"]
    assert any(r["dst"] == f"{ep['ipv4']}/32" and r["oif"] == ep["ifindex"]
               for r in plumbing.routes(node_ns))
    # and it carries traffic: the pod reaches the world namespace through the node
    assert ping(fresh_lab, "web", "198.51.100.10")


def test_delete_leaves_no_link_route_or_address_behind(fresh_lab):
    before_links = _lxc_links(fresh_lab)
    pods = [fresh_lab.add_pod(f"p{i}", {"app": f"p{i}"}) for i in range(3)]
    assert len(_lxc_links(fresh_lab)) == len(before_links) + 3
    assert set(_ipam(fresh_lab)) == {p["ip"] for p in pods}
    for pod in pods:
        fresh_lab.remove_pod(pod["name"])
    assert _lxc_links(fresh_lab) == before_links
    assert _ipam(fresh_lab) == {}
    routes = plumbing.routes(fresh_lab.node()["netns"])
    assert not [r for r in routes if r["dst"].startswith("10.200.1.")]
    assert api(fresh_lab).get("/v1/endpoint") == []
    with pytest.raises(UserError, match="not found"):
        api(fresh_lab).get("/v1/endpoint/p0")
    # the datapath forgot them too: endpoints map and ipcache
    assert api(fresh_lab).get("/v1/bpf/endpoints") == []
    assert not [e for e in api(fresh_lab).get("/v1/bpf/ipcache")
                if e["cidr"].startswith("10.200.1.")]
    # an address comes back to the pool: 3 more pods fit without growing the allocation
    again = fresh_lab.add_pod("again", {"app": "again"})
    assert list(_ipam(fresh_lab)) == [again["ip"]]


def test_bad_requests_are_400_with_one_line(fresh_lab):
    client = api(fresh_lab)
    netns = plumbing.create_netns(f"{fresh_lab.name}-bad")
    try:
        cases = [
            ({"labels": {"k8s:app": "x"}, "netns": str(netns)}, "labels"),
            ({"labels": {"app": "x y"}, "netns": str(netns)}, "labels.app"),
            ({"labels": {"app": "x"}, "netns": "/run/netns/nope-nope"}, "netns"),
            ({"labels": {"app": "x"}}, "netns"),
            ({"labels": {"app": "x"}, "netns": str(netns), "color": "red"}, "color"),
            ({"labels": [], "netns": str(netns)}, "labels"),
        ]
        for body, field in cases:
            with pytest.raises(UserError) as err:
                client.put("/v1/endpoint/bad", body)
            assert str(err.value).startswith(field) and "\n" not in str(err.value)
        with pytest.raises(UserError, match="not a valid name"):
            client.put("/v1/endpoint/Bad_Name", {"netns": str(netns)})
        fresh_lab.add_pod("dup", {"app": "dup"})
        with pytest.raises(UserError, match="already exists"):
            client.put("/v1/endpoint/dup", {"netns": str(netns)})
        with pytest.raises(UserError, match="already belongs"):
            client.put("/v1/endpoint/other", {"netns": fresh_lab.pod("dup")["netns"]})
        # nothing half-made by the refused requests
        assert [e["name"] for e in client.get("/v1/endpoint")] == ["dup"]
        assert len(_lxc_links(fresh_lab)) == 1
    finally:
        plumbing.remove_netns(f"{fresh_lab.name}-bad")


def test_cli_lists_and_gets_endpoints(fresh_lab):
    fresh_lab.add_pod("tiefighter", {"org": "empire", "class": "tiefighter"})
    cli = [str(Path(sys.executable).with_name("pylium")), "-H", fresh_lab.node()["socket"]]
    table = subprocess.run([*cli, "endpoint", "list"], capture_output=True, text=True,
                           check=True).stdout
    for column in ("ENDPOINT", "POLICY (ingress) ENFORCEMENT", "IDENTITY", "IPv4", "STATUS"):
        assert column in table
    assert "k8s:org=empire" in table and "ready" in table
    rows = json.loads(subprocess.run([*cli, "endpoint", "list", "-o", "json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert [r["name"] for r in rows] == ["tiefighter"]
    one = json.loads(subprocess.run([*cli, "endpoint", "get", str(rows[0]["id"]), "-o", "json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert one["ipv4"] == rows[0]["ipv4"]
    missing = subprocess.run([*cli, "endpoint", "get", "999"], capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stderr.startswith("Error: endpoint 999 not found")


def test_patch_labels_changes_identity(fresh_lab):
    fresh_lab.add_pod("a", {"app": "one"})
    client = api(fresh_lab)
    before = client.get("/v1/endpoint/a")
    after = client.request("PATCH", "/v1/endpoint/a", {"labels": {"app": "two"}})
    assert after["identity"] != before["identity"]
    assert after["identity_labels"][0] == "k8s:app=two"
    assert (after["id"], after["ipv4"], after["ifindex"]) == \
        (before["id"], before["ipv4"], before["ifindex"])
