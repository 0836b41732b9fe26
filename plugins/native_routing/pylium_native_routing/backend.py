"""The `native` backend: a route per remote node (its pod CIDR via its underlay IP). No
encapsulation and no BPF of its own: the endpoint program's remote slot stays empty, so the
node's stack forwards; the receiving node's to_container program finds the source identity
in the ipcache by source IP (the cluster's node registry fills it with remote pods)."""

from __future__ import annotations

from typing import Any

from pylium.api.routing import NodeInfo
from pylium.datapath import netns as plumbing
from pylium.errors import UserError
from pylium.routing.base import RoutedNodes


class NativeRouting(RoutedNodes):
    name = "native"
    mtu_overhead = 0

    def __init__(self, context, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        if self.options:
            raise UserError(f"plugin_options.native: unknown option(s) "
                            f"{', '.join(sorted(self.options))}")

    def setup_node(self, local: NodeInfo) -> None:
        self.local = local
        plumbing.write_sysctl(None, "net.ipv4.ip_forward", "1")

    def program_node(self, node: NodeInfo) -> None:
        self.add_node_route(node)

    def unprogram_node(self, node: NodeInfo) -> None:
        self.delete_node_route(node)

    def teardown(self) -> None:
        """The node routes go (`net.ipv4.ip_forward` stays: what it was before is unknown
        and other forwarding on the node may need it)."""
        super().teardown()
        self.delete_node_routes()
