"""Agent component "routing": the routing-mode backend selected by `routing_mode` (built and
started by the capability lifecycle, `pylium.agent.capabilities`), holding the node up and
taking node join/leave events (from the cluster's node registry or the API) to it. The pod MTU the endpoint manager wires veths with
is the underlay MTU minus the mode's overhead.

Switching modes is a config change plus an agent restart: at start the capability lifecycle
builds the mode the previous run recorded (`capabilities.json`) and calls its `teardown()`,
which removes its devices, programs and node routes; the component then empties the routing
slot and removes pylium's programs from the underlay link anyway (a node upgraded from a
version that kept no record), and the new mode sets up its own."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from pylium.agent.node_events import NodeEvents
from pylium.datapath import netns as plumbing
from pylium.datapath import tc
from pylium.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MTU = 1500


class Routing(NodeEvents):
    """`daemon.components["routing"]`: the selected mode and the pod MTU it leaves."""

    def __init__(self, name: str, backend: Any, context: Any):
        super().__init__("routing", name, backend, context)
        self.pod_mtu = context.underlay_mtu - self.mtu_overhead

    def status(self) -> dict[str, Any]:
        extra = self.backend_status()
        return {
            "mode": self.name,
            "node": {"name": self.local.name, "ipv4": str(self.local.ipv4),
                     "pod_cidr": str(self.local.pod_cidr)},
            "underlay": {"ifname": self.context.underlay_ifname,
                         "mtu": self.context.underlay_mtu},
            "mtu_overhead": self.mtu_overhead,
            "pod_mtu": self.pod_mtu,
            "nodes": [{"name": n.name, "ipv4": str(n.ipv4), "pod_cidr": str(n.pod_cidr)}
                      for n in sorted(self.nodes.values(), key=lambda n: n.name)],
            "errors": dict(self.errors),
            **{k: v for k, v in extra.items() if k != "nodes"},
        }


def _reset_previous_mode(datapath: Any, underlay_ifname: str) -> None:
    if datapath is not None:
        datapath.set_routing_slot(0, None)
    if underlay_ifname:
        index = socket.if_nametoindex(underlay_ifname)
        for point in (tc.INGRESS, tc.EGRESS):
            tc.detach(index, point)


def underlay_of(daemon, mode: str) -> dict[str, Any]:
    """The underlay link (the one holding `node_ip`) and its MTU, as contexts carry them;
    every mode but "local" needs one."""
    node_ip = daemon.config.node_ip
    underlay = ""
    mtu = DEFAULT_MTU
    if node_ip:
        underlay = plumbing.link_with_address(node_ip) or ""
        if underlay:
            mtu = plumbing.link_mtu(underlay)
    if mode != "local":
        if not node_ip:
            raise ConfigError(f"node_ip: routing mode {mode!r} needs this node's underlay "
                              "address")
        if not underlay:
            raise ConfigError(f"node_ip: no interface in the agent's network namespace holds "
                              f"{node_ip}")
    return {"underlay_ifname": underlay, "underlay_mtu": mtu}


async def start_routing(daemon, running) -> Routing:
    """Called by the capability lifecycle with the built backend: empty what a previous mode
    left, then let the selected mode set the node up."""
    context = running.backend.context
    # what a previous mode left must not carry traffic; "local" never touches interfaces
    await asyncio.to_thread(_reset_previous_mode, context.datapath,
                            context.underlay_ifname if running.name != "local" else "")
    routing = Routing(running.name, running.backend, context)
    await routing.setup()
    log.info("routing mode %s on %s (underlay %s, mtu %d, pod mtu %d)", running.name,
             context.node.ipv4, context.underlay_ifname or "-", context.underlay_mtu,
             routing.pod_mtu)
    return routing
