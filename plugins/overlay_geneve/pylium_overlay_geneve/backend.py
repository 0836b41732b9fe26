"""The `geneve` backend: Geneve encapsulated and decapsulated in BPF on the node's underlay
link (this kernel has no Geneve device). Each remote node gets a route (its pod CIDR via its
underlay IP), so the stack picks the outer next hop; the egress program wraps pod packets
headed to a tunnel endpoint with VNI = source identity; the ingress program unwraps Geneve
to this node and delivers to the endpoint with the VNI as the source identity."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any

from pylium.api.routing import NodeInfo
from pylium.datapath import tc
from pylium.errors import UserError
from pylium.routing.tunnel import TunnelRouting

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent / "bpf"
BPF_SOURCE = "bpf_geneve.c"
DEFAULT_PORT = 6081  # IANA
#: compile-time defines (the record lists them); the node's address and the configured
#: port are the backend's to know, so the core loads the object on `context.load_bpf`
DEFINES = {"TUNNEL_TTL": 64, "GENEVE_PORT": DEFAULT_PORT}
RUNTIME_DEFINES = ("GENEVE_PORT", "NODE_IP")


class OverlayGeneve(TunnelRouting):
    name = "geneve"
    default_port = DEFAULT_PORT

    def __init__(self, context, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        unknown = set(self.options) - {"port"}
        if unknown:
            raise UserError(f"plugin_options.geneve: unknown option(s) {', '.join(sorted(unknown))}")

    def setup_tunnel(self) -> None:
        datapath = self.context.datapath
        if datapath is None:
            raise UserError("routing mode geneve needs the datapath component")
        node_ip = int(ipaddress.IPv4Address(self.context.node.ipv4))
        bpf = self.context.load_bpf(GENEVE_PORT=self.port, NODE_IP=f"{node_ip}u")
        index = socket.if_nametoindex(self.context.underlay_ifname)
        tc.attach(index, tc.EGRESS, bpf.program("geneve_egress"))
        tc.attach(index, tc.INGRESS, bpf.program("geneve_ingress"))
        log.info("geneve: BPF encap/decap on %s (UDP %d)", self.context.underlay_ifname, self.port)

    def program_node(self, node: NodeInfo) -> None:
        self.add_node_route(node)

    def unprogram_node(self, node: NodeInfo) -> None:
        self.delete_node_route(node)

    def teardown_tunnel(self) -> None:
        """The programs leave the underlay link and every node route goes (also those of
        a run before: a backend built to tear down a deselected geneve knows no nodes)."""
        index = socket.if_nametoindex(self.context.underlay_ifname)
        for point in (tc.EGRESS, tc.INGRESS):
            tc.detach(index, point)
        self.delete_node_routes()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "device": self.context.underlay_ifname,
                "encapsulation": "bpf"}
