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
    `program_node()`/`unprogram_node()` (per remote node, from `RoutedNodes`),
    `teardown_tunnel()`."""

    mtu_overhead = TUNNEL_OVERHEAD
    default_port = 0

    def __init__(self, context: RoutingContext, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.port = option_int(self.options, "port", self.default_port, 1, 65535, self.name)

    @property
    def overhead(self) -> int:
        return self.mtu_overhead

    def setup_node(self, local: NodeInfo) -> None:
        self.local = local
        self.setup_tunnel()

    def teardown(self) -> None:
        super().teardown()
        self.teardown_tunnel()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "port": self.port, "vni": "source identity"}

    @abc.abstractmethod
    def setup_tunnel(self) -> None: ...

    @abc.abstractmethod
    def teardown_tunnel(self) -> None: ...
