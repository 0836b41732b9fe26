"""Switching routing modes (a config change plus an agent restart) leaves only the new
mode's state: the capability lifecycle builds the mode the previous run recorded and tears
it down before the new one starts. A real two-node lab (node namespaces, an underlay bridge,
one agent each) goes vxlan through the kernel's device -> geneve -> native -> vxlan in BPF
(-> the device again, an option change within one mode), checking at each step that the previous mode's device, programs on the underlay link and
node routes are gone, the new mode's are there, and pods on the two nodes reach each
other."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from pylium.lab.lab import Lab
from pylium.lab.processes import stop_process
from pylium.routing.base import NODE_ROUTE_PROTO

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

NODES = ("node1", "node2")
OTHER = {"node1": "node2", "node2": "node1"}
PODS = {"p1": "node1", "p2": "node2"}
DEVICE = "pylium_vxlan"
#: a route a mode left for a node that left the cluster while its agent was down
STALE = "10.254.77.0/24"


def ns_run(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, check=check, timeout=30)


def has_link(netns: str, name: str) -> bool:
    return ns_run(netns, "ip", "link", "show", "dev", name, check=False).returncode == 0


#: the routing modes' programs on the underlay link (the core has its own there too)
MODE_PROGRAMS = {"geneve_ingress", "geneve_egress", "vxlan_ingress", "vxlan_egress"}


def underlay_programs(netns: str) -> set[str]:
    """Names of the BPF programs on the node's underlay link (eth0), both directions."""
    names = set()
    for point in ("ingress", "egress"):
        out = ns_run(netns, "tc", "filter", "show", "dev", "eth0", point, check=False).stdout
        names |= set(re.findall(r"\bname (\S+)", out))
    return names


def node_routes(netns: str) -> set[str]:
    """Destinations of the routes a routing mode added (its route protocol)."""
    out = ns_run(netns, "ip", "-4", "route", "show", "proto", str(NODE_ROUTE_PROTO)).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def restart(lab: Lab, mode: str, options: dict | None = None) -> None:
    """Every node's agent stopped and started again with `routing_mode: mode`."""
    for name in NODES:
        entry = lab.node(name)
        stop_process(entry["agent_pid"], entry["state_dir"])
    for name in NODES:
        path = Path(lab.node(name)["state_dir"]) / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["routing_mode"] = mode
        config.pop("plugin_options", None)
        if options:
            config["plugin_options"] = options
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        lab.start_agent(lab.node(name))


def ran(lab: Lab, node: str) -> dict:
    return json.loads((Path(lab.node(node)["state_dir"]) / "capabilities.json").read_text())


def wait_ping(lab: Lab, src: str, dst: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = lab.exec(src, ["ping", "-c", "1", "-W", "1", lab.pod(dst)["ip"]], timeout=10)
        if proc.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{src} -> {dst}: {proc.stdout}{proc.stderr}"
        time.sleep(0.3)


def check_mode(lab: Lab, mode: str) -> None:
    for node in NODES:
        routing = lab.client(node).get("/v1/routing")
        assert routing["mode"] == mode, routing
        assert ran(lab, node)["routing"] == [mode]
    wait_ping(lab, "p1", "p2")
    wait_ping(lab, "p2", "p1")


def test_switching_modes_leaves_only_the_new_modes_state():
    lab = Lab(f"tidy5{uuid.uuid4().hex[:3]}")
    try:
        lab.up(nodes=2, routing="vxlan",
               agent_settings={"plugin_options": {"vxlan": {"encapsulation": "device"}}})
        for pod, node in PODS.items():
            lab.add_pod(pod, {"app": pod}, node=node)
        netns = {n: lab.node(n)["netns"] for n in NODES}
        pod_cidr = {n: lab.node(n)["pod_cidr"] for n in NODES}
        check_mode(lab, "vxlan")
        core = {n: underlay_programs(netns[n]) - MODE_PROGRAMS for n in NODES}
        assert all(core.values()), core  # the core's own stay through every switch

        def mode_programs(node: str) -> set[str]:
            found = underlay_programs(netns[node])
            assert found - MODE_PROGRAMS == core[node], found
            return found & MODE_PROGRAMS

        for node in NODES:
            assert has_link(netns[node], DEVICE)
            assert mode_programs(node) == set()
            assert node_routes(netns[node]) == set()  # the device carries it, no routes

        # vxlan (device) -> geneve: the device and its program go; geneve's programs and
        # a route to the other node's pods come
        restart(lab, "geneve")
        check_mode(lab, "geneve")
        for node, other in OTHER.items():
            assert not has_link(netns[node], DEVICE)
            assert mode_programs(node) == {"geneve_ingress", "geneve_egress"}
            assert node_routes(netns[node]) == {pod_cidr[other]}

        # geneve -> native: no program stays on the underlay link; a route geneve left for
        # a node that is gone now goes too, native adds the live nodes' again
        ns_run(netns["node1"], "ip", "route", "add", STALE, "via", lab.node("node2")["ip"],
               "dev", "eth0", "proto", str(NODE_ROUTE_PROTO))
        restart(lab, "native")
        check_mode(lab, "native")
        for node, other in OTHER.items():
            assert mode_programs(node) == set()
            assert node_routes(netns[node]) == {pod_cidr[other]}
            assert not has_link(netns[node], DEVICE)

        # native -> vxlan in BPF: its programs on the underlay link, routes, no device
        restart(lab, "vxlan")
        check_mode(lab, "vxlan")
        for node, other in OTHER.items():
            assert mode_programs(node) == {"vxlan_ingress", "vxlan_egress"}
            assert node_routes(netns[node]) == {pod_cidr[other]}
            assert not has_link(netns[node], DEVICE)

        # the same mode, the other encapsulation (no teardown: still selected): the device
        # mode drops the node routes and programs the BPF one left
        restart(lab, "vxlan", {"vxlan": {"encapsulation": "device"}})
        check_mode(lab, "vxlan")
        for node in NODES:
            assert has_link(netns[node], DEVICE)
            assert mode_programs(node) == set()
            assert node_routes(netns[node]) == set()
    finally:
        lab.down()
