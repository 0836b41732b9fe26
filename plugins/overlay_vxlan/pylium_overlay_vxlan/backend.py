"""The `vxlan` backend, two ways to encapsulate (plugin option `encapsulation`):

- `bpf` (default): no device; VXLAN is added and removed by tc programs on the underlay
  link (the core's `bpf/lib/encap.h`, as the geneve plugin does), each remote node's pod
  CIDR routed via its underlay IP. Measured at 0.95 of plain routes where the device path
  gets 0.81-0.96 (issue 16's goal is 0.9), so it is the default.
- `device`: one collect_md VXLAN device per node; the endpoint program's remote slot sets
  the tunnel key (VNI = source identity) and redirects to it, and a program on its ingress
  delivers to local endpoints with the VNI as the source identity.
Same wire format both ways (UDP `port`, I flag, VNI = source identity): they interoperate."""

from __future__ import annotations

import ipaddress
import logging
import socket
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
ENCAPSULATIONS = ("device", "bpf")
DEFAULT_ENCAPSULATION = "bpf"
#: compile-time defines (the record lists them); the device's ifindex (0 without one), the
#: port and the node's address are the backend's to know, so the core loads the object
#: when the backend calls `context.load_bpf`
DEFINES = {"TUNNEL_TTL": 64, "VXLAN_PORT": DEFAULT_PORT}
RUNTIME_DEFINES = ("VXLAN_IFINDEX", "VXLAN_PORT", "NODE_IP")


class OverlayVxlan(TunnelRouting):
    name = "vxlan"
    default_port = DEFAULT_PORT

    def __init__(self, context, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        unknown = set(self.options) - {"port", "device", "encapsulation"}
        if unknown:
            raise UserError(f"plugin_options.vxlan: unknown option(s) {', '.join(sorted(unknown))}")
        self.device = str(self.options.get("device", DEVICE))
        self.encapsulation = self.options.get("encapsulation", DEFAULT_ENCAPSULATION)
        if self.encapsulation not in ENCAPSULATIONS:
            raise UserError(f"plugin_options.vxlan.encapsulation: {self.encapsulation!r} is not "
                            f"one of {', '.join(ENCAPSULATIONS)}")
        self.ifindex = 0

    @property
    def in_bpf(self) -> bool:
        return self.encapsulation == "bpf"

    def setup_tunnel(self) -> None:
        datapath = self.context.datapath
        if datapath is None:
            raise UserError("routing mode vxlan needs the datapath component")
        node_ip = f"{int(ipaddress.IPv4Address(self.context.node.ipv4))}u"
        if self.in_bpf:
            # a device left by the other mode would be a second receiver of the same port
            plumbing.delete_link(self.device)
            datapath.set_routing_slot(0, None)  # the stack routes; the underlay link wraps
            bpf = self.context.load_bpf(VXLAN_IFINDEX=0, VXLAN_PORT=self.port, NODE_IP=node_ip)
            index = socket.if_nametoindex(self.context.underlay_ifname)
            tc.attach(index, tc.EGRESS, bpf.program("vxlan_egress"))
            tc.attach(index, tc.INGRESS, bpf.program("vxlan_ingress"))
            log.info("vxlan: BPF encap/decap on %s (UDP %d)", self.context.underlay_ifname,
                     self.port)
            return
        mtu = self.context.underlay_mtu - self.mtu_overhead
        # node routes the other encapsulation left would carry host traffic unwrapped
        self.delete_node_routes()
        self._remember_device()
        link = plumbing.create_vxlan_external(self.device, self.port, mtu)
        plumbing.write_sysctl(None, f"net.ipv6.conf.{self.device}.disable_ipv6", "1")
        bpf = self.context.load_bpf(VXLAN_IFINDEX=link.ifindex, VXLAN_PORT=self.port,
                                    NODE_IP=node_ip)
        tc.attach(link.ifindex, tc.INGRESS, bpf.program("from_overlay"))
        datapath.set_routing_slot(0, bpf.program("to_overlay"))
        self.ifindex = link.ifindex
        log.info("vxlan: device %s (ifindex %d, UDP %d, mtu %d)", self.device, link.ifindex,
                 self.port, mtu)

    # device: the remote is in each packet's tunnel key, nothing per node; bpf: the stack
    # routes each remote pod CIDR to its node, and the egress program wraps it there
    def program_node(self, node: NodeInfo) -> None:
        if self.in_bpf:
            self.add_node_route(node)

    def unprogram_node(self, node: NodeInfo) -> None:
        if self.in_bpf:
            self.delete_node_route(node)

    def teardown_tunnel(self) -> None:
        """Both encapsulations' state, whichever ran: a backend built to tear down a
        deselected vxlan has today's options, not those of the run that left the state.
        The underlay programs, the endpoint program's remote slot, the device (every name
        a run used) and every node route go."""
        index = socket.if_nametoindex(self.context.underlay_ifname)
        for point in (tc.EGRESS, tc.INGRESS):
            tc.detach(index, point)
        if self.context.datapath is not None:
            self.context.datapath.set_routing_slot(0, None)
        for device in sorted({self.device, *self._remembered_devices()}):
            if plumbing.delete_link(device):
                log.info("vxlan: device %s deleted", device)
        self._forget_devices()
        self.delete_node_routes()

    # the device names runs used (option `device`), in the state dir: teardown finds them
    # even when the option changed or is gone since
    def _devices_file(self) -> Path | None:
        state_dir = self.context.state_dir
        return Path(state_dir) / "devices" if state_dir is not None else None

    def _remembered_devices(self) -> set[str]:
        path = self._devices_file()
        try:
            return set(path.read_text().split()) if path is not None else set()
        except FileNotFoundError:
            return set()

    def _remember_device(self) -> None:
        path = self._devices_file()
        names = self._remembered_devices()
        if path is not None and self.device not in names:
            path.write_text("".join(f"{n}\n" for n in sorted(names | {self.device})))

    def _forget_devices(self) -> None:
        path = self._devices_file()
        if path is not None:
            path.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        device = self.context.underlay_ifname if self.in_bpf else self.device
        return {**super().status(), "device": device, "encapsulation": self.encapsulation}
