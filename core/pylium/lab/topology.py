"""The lab's network: namespaces, the underlay bridge and the world (for lab name `pyl`;
every name starts with the lab name, so labs never collide):

    pyl-underlay (netns)  bridge br0 ─┬─ n1 ── eth0 pyl-node1 (192.168.100.11)
                                      ├─ n2 ── eth0 pyl-node2 (192.168.100.12)  [--nodes 2]
                                      ├─ kv ── eth0 pyl-kv    (192.168.100.2)   [--kvstore etcd]
                                      └─ world ── eth0 pyl-world (192.168.100.1,
                                                     198.51.100.10 and .20 on lo)
    pyl-node1: ip_forward on, default route via the world; pods' /32 routes on lxc* veths
    pyl-<pod>: eth0 with the pod IP (wired by the node's agent, not here)

The world namespace stands for "outside the cluster": nodes route there by default and it
routes each node's pod CIDR back to that node. Traffic never leaves namespaces the lab made;
the root namespace's interfaces and routes are not touched. The underlay bridge is where the
routing mode (`--routing vxlan|geneve|native`) carries pod traffic between nodes; with one
node nothing crosses it but world traffic. The world does not forward between nodes, so
with `--nodes 2` and no routing mode, pods on different nodes do not reach each other (each
node's pods do reach the world, and the world reaches them)."""

from __future__ import annotations

import logging
from typing import Any

from pylium.datapath import netns as plumbing
from pylium.errors import UserError
from pylium.lab.state import LabState, State

log = logging.getLogger(__name__)

UNDERLAY_PREFIX = "192.168.100."
WORLD_IP = UNDERLAY_PREFIX + "1"
#: addresses "in the world" for CIDR-rule tests (TEST-NET-2), on the world's loopback
WORLD_EXTRA_IPS = ("198.51.100.10", "198.51.100.20")


class Topology:
    def __init__(self, store: LabState):
        self.store = store
        self.name = store.name

    def ns(self, what: str) -> str:
        """The lab's name for one of its namespaces."""
        return f"{self.name}-{what}"

    def add_netns(self, state: State, name: str) -> str:
        """Record, then create, a namespace (so `down` finds it even if creation fails)."""
        state["netns"].append(name)
        self.store.save(state)
        plumbing.create_netns(name)
        return name

    def remove_netns(self, state: State, name: str) -> None:
        """Remove a namespace, then forget it (if removal fails, `down` tries again)."""
        plumbing.remove_netns(name)
        state["netns"] = [n for n in state["netns"] if n != name]
        self.store.save(state)

    def make_underlay(self, state: State) -> None:
        """The bridge namespace and the world plugged into it."""
        underlay = self.add_netns(state, self.ns("underlay"))
        plumbing.create_bridge("br0", underlay)
        world = self.plug(state, "world", "world", WORLD_IP)
        for extra in WORLD_EXTRA_IPS:
            plumbing.add_address("lo", f"{extra}/32", world)
        state["world"] = {"netns": world, "ip": WORLD_IP, "extra_ips": list(WORLD_EXTRA_IPS)}
        self.store.save(state)

    def plug(self, state: State, what: str, link: str, ip: str) -> str:
        """A new namespace `<lab>-<what>` whose eth0 (`ip`/24) hangs on the underlay bridge
        as `link`; returns the namespace's name."""
        netns = self.add_netns(state, self.ns(what))
        plumbing.create_veth(link, self.ns("underlay"), "eth0", netns)
        plumbing.set_link_up(link, self.ns("underlay"), master="br0")
        plumbing.add_address("eth0", f"{ip}/24", netns)
        return netns

    def make_node(self, state: State, index: int) -> dict[str, Any]:
        """Node `index`'s namespace, routed through the world, which routes its pod CIDR
        back; returns the node's entry (not yet in `state["nodes"]`)."""
        name = f"node{index}"
        ip = f"{UNDERLAY_PREFIX}{10 + index}"
        pod_cidr = f"10.200.{index}.0/24"
        netns = self.plug(state, name, f"n{index}", ip)
        plumbing.add_route("default", netns, gateway=WORLD_IP)
        plumbing.write_sysctl(netns, "net.ipv4.ip_forward", "1")
        plumbing.add_route(pod_cidr, self.ns("world"), gateway=ip)
        return {"name": name, "netns": netns, "ip": ip, "pod_cidr": pod_cidr}

    def netns_of(self, state: State, target: str) -> str:
        """The namespace of a pod, a node or the world, by name."""
        names = {p["name"]: p["netns"] for p in state["pods"]}
        names.update({n["name"]: n["netns"] for n in state["nodes"]})
        names["world"] = state["world"]["netns"]
        if target not in names:
            raise UserError(f"no pod or node {target!r} in lab {self.name} "
                            f"(known: {', '.join(names)})")
        return names[target]

    def teardown(self, state: State) -> None:
        """Remove every namespace the lab recorded (their links go with them), newest first."""
        for name in reversed(state.get("netns", [])):
            try:
                plumbing.remove_netns(name)
            except OSError as exc:
                log.error("removing netns %s: %s", name, exc)
