"""The pieces more than one routing backend uses (the context they are handed lives in
`pylium.api.context`)."""

from __future__ import annotations

import abc
import ipaddress
import logging
from typing import Any

from pylium.api.context import RoutingContext
from pylium.api.routing import NodeInfo, RoutingMode
from pylium.datapath import netns as plumbing
from pylium.errors import UserError

log = logging.getLogger(__name__)

#: the route protocol (rtm_protocol) node routes carry: a mode torn down after a restart has
#: no list of the nodes it programmed, so it finds its routes by this mark (an unused
#: number in iproute2's rt_protos)
NODE_ROUTE_PROTO = 176


def option_int(options: dict[str, Any], key: str, default: int, low: int, high: int,
               plugin: str) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"plugin_options.{plugin}.{key}: {value!r} is not an integer in "
                        f"{low}..{high}")
    return value


class RoutedNodes(RoutingMode):
    """The per-node bookkeeping every cross-node mode needs, in one place: remote nodes are
    checked, remembered, programmed when they join (re-programmed when their address or pod
    CIDR changes) and unprogrammed when they leave. Subclasses say what programming a node
    means (`program_node`/`unprogram_node`); `add_node_route`/`delete_node_route` keep one
    route per remote node (its pod CIDR via its underlay IP on the underlay link): native
    routing carries pod traffic on it, the BPF Geneve overlay picks the outer next hop."""

    def __init__(self, context: RoutingContext, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.nodes: dict[str, NodeInfo] = {}
        self.local: NodeInfo | None = None

    @abc.abstractmethod
    def program_node(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def unprogram_node(self, node: NodeInfo) -> None: ...

    def node_joined(self, node: NodeInfo) -> None:
        if self.local is not None and node.name == self.local.name:
            return
        self.check_remote(node)
        old = self.nodes.get(node.name)
        if old is not None and (old.ipv4, old.pod_cidr) != (node.ipv4, node.pod_cidr):
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

    def add_node_route(self, node: NodeInfo) -> None:
        plumbing.add_route(str(node.pod_cidr), None, gateway=str(node.ipv4),
                           ifname=self.context.underlay_ifname, proto=NODE_ROUTE_PROTO)

    def delete_node_route(self, node: NodeInfo) -> None:
        for route in plumbing.routes():
            if route["dst"] == str(node.pod_cidr) and route["gateway"] == str(node.ipv4):
                plumbing.delete_route(str(node.pod_cidr))

    def delete_node_routes(self) -> None:
        """Every node route a routing mode left (`NODE_ROUTE_PROTO`), also those of nodes
        this backend never heard of: teardown of a mode a previous run selected."""
        gone = plumbing.delete_routes(NODE_ROUTE_PROTO)
        if gone:
            log.info("%s: deleted node routes %s", self.name, ", ".join(gone))

    def check_remote(self, node: NodeInfo) -> None:
        local = self.context.node
        if node.pod_cidr.overlaps(local.pod_cidr):
            raise UserError(f"node {node.name}: pod CIDR {node.pod_cidr} overlaps this node's "
                            f"{local.pod_cidr}")
        if node.ipv4 == local.ipv4:
            raise UserError(f"node {node.name}: underlay IP {node.ipv4} is this node's")

    def status(self) -> dict[str, Any]:
        return {"nodes": sorted(n.name for n in self.nodes.values())}


def same_subnet(a: ipaddress.IPv4Address, b: ipaddress.IPv4Address, prefix: int) -> bool:
    return ipaddress.IPv4Network(f"{a}/{prefix}", strict=False) == \
        ipaddress.IPv4Network(f"{b}/{prefix}", strict=False)
