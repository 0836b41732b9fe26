"""What every routing backend is handed, and the pieces more than one backend uses."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import attrs

from pylium.api.routing import NodeInfo, RoutingMode
from pylium.datapath import netns as plumbing
from pylium.errors import UserError

log = logging.getLogger(__name__)


@attrs.frozen
class RoutingContext:
    """The node as a backend sees it: the opened endpoint datapath (None in unit tests),
    the underlay link (the one holding the node IP) and its MTU."""

    datapath: Any
    node: NodeInfo
    underlay_ifname: str
    underlay_mtu: int


def option_int(options: dict[str, Any], key: str, default: int, low: int, high: int,
               plugin: str) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"plugin_options.{plugin}.{key}: {value!r} is not an integer in "
                        f"{low}..{high}")
    return value


class RoutedNodes(RoutingMode):
    """Keeps one route per remote node: its pod CIDR via its underlay IP on the underlay
    link. Native routing carries pod traffic on these routes; the BPF Geneve overlay uses
    them to pick the outer next hop (and its MAC)."""

    def __init__(self, context: RoutingContext, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.nodes: dict[str, NodeInfo] = {}

    def add_node_route(self, node: NodeInfo) -> None:
        plumbing.add_route(str(node.pod_cidr), None, gateway=str(node.ipv4),
                           ifname=self.context.underlay_ifname)

    def delete_node_route(self, node: NodeInfo) -> None:
        for route in plumbing.routes():
            if route["dst"] == str(node.pod_cidr) and route["gateway"] == str(node.ipv4):
                plumbing.delete_route(str(node.pod_cidr))

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
