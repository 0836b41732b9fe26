"""The `vxlan` backend: one collect_md VXLAN device per node; the endpoint program's remote
slot sets the tunnel key (VNI = source identity) and redirects to it, and a program on its
ingress delivers to local endpoints with the VNI as the source identity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pylium.api.routing import NodeInfo
from pylium.datapath import netns as plumbing
from pylium.datapath import tc
from pylium.errors import UserError
from pylium.routing.tunnel import TunnelRouting

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent / "bpf"
BPF_SOURCE = "bpf_vxlan.c"
DEFAULT_PORT = 8472  # Cilium's
DEVICE = "pylium_vxlan"
#: compile-time defines (the record lists them); VXLAN_IFINDEX is the device this backend
#: creates, so the core loads the object when the backend calls `context.load_bpf`
DEFINES = {"TUNNEL_TTL": 64}
RUNTIME_DEFINES = ("VXLAN_IFINDEX",)


class OverlayVxlan(TunnelRouting):
    name = "vxlan"
    default_port = DEFAULT_PORT

    def __init__(self, context, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        unknown = set(self.options) - {"port", "device"}
        if unknown:
            raise UserError(f"plugin_options.vxlan: unknown option(s) {', '.join(sorted(unknown))}")
        self.device = str(self.options.get("device", DEVICE))

    def setup_tunnel(self) -> None:
        datapath = self.context.datapath
        if datapath is None:
            raise UserError("routing mode vxlan needs the datapath component")
        mtu = self.context.underlay_mtu - self.mtu_overhead
        link = plumbing.create_vxlan_external(self.device, self.port, mtu)
        plumbing.write_sysctl(None, f"net.ipv6.conf.{self.device}.disable_ipv6", "1")
        bpf = self.context.load_bpf(VXLAN_IFINDEX=link.ifindex)
        tc.attach(link.ifindex, tc.INGRESS, bpf.program("from_overlay"))
        datapath.set_routing_slot(0, bpf.program("to_overlay"))
        self.ifindex = link.ifindex
        log.info("vxlan: device %s (ifindex %d, UDP %d, mtu %d)", self.device, link.ifindex,
                 self.port, mtu)

    # collect_md: the remote is in each packet's tunnel key; nothing per node
    def program_node(self, node: NodeInfo) -> None:
        return None

    def unprogram_node(self, node: NodeInfo) -> None:
        return None

    def teardown_tunnel(self) -> None:
        if self.context.datapath is not None:
            self.context.datapath.set_routing_slot(0, None)
        plumbing.delete_link(self.device)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "device": self.device}
