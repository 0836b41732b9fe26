"""The shared base of the overlays (neutron's `type_tunnel` idea): a tunnel is a UDP port,
an MTU overhead and per-node tunnel state; the VNI carries the source security identity
(Cilium's scheme), so the receiving node learns who sent a packet from the tunnel header,
never from the sending node's address."""

from __future__ import annotations

import abc
from typing import Any

from pylium.api.routing import NodeInfo
from pylium.routing.base import RoutedNodes, RoutingContext, option_int

#: outer IPv4 20 + UDP 8 + VXLAN/Geneve 8 + inner Ethernet 14
TUNNEL_OVERHEAD = 50
#: identities travel in the 24-bit VNI (endpoint identities are below 2**24 already)
VNI_MAX = (1 << 24) - 1


class TunnelRouting(RoutedNodes):
    """Subclasses set `name`, `default_port` and implement the tunnel: `setup_tunnel()`,
    `program_node()`/`unprogram_node()` (per remote node), `teardown_tunnel()`."""

    mtu_overhead = TUNNEL_OVERHEAD
    default_port = 0

    def __init__(self, context: RoutingContext, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.port = option_int(self.options, "port", self.default_port, 1, 65535, self.name)
        self.local: NodeInfo | None = None

    @property
    def overhead(self) -> int:
        return self.mtu_overhead

    def setup_node(self, local: NodeInfo) -> None:
        self.local = local
        self.setup_tunnel()

    def node_joined(self, node: NodeInfo) -> None:
        if self.local is not None and node.name == self.local.name:
            return
        self.check_remote(node)
        old = self.nodes.get(node.name)
        if old is not None and old != node:
            self.unprogram_node(old)
        self.nodes[node.name] = node
        self.program_node(node)

    def node_left(self, node: NodeInfo) -> None:
        known = self.nodes.pop(node.name, None)
        if known is not None:
            self.unprogram_node(known)

    def teardown(self) -> None:
        for node in list(self.nodes.values()):
            self.node_left(node)
        self.teardown_tunnel()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "port": self.port, "vni": "source identity"}

    @abc.abstractmethod
    def setup_tunnel(self) -> None: ...

    @abc.abstractmethod
    def program_node(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def unprogram_node(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def teardown_tunnel(self) -> None: ...
