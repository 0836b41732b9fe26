"""Routing-mode contract: how packets reach pods on other nodes."""

from __future__ import annotations

from pylium.api.node import NodeCapability, NodeInfo

__all__ = ["NodeInfo", "RoutingMode"]


class RoutingMode(NodeCapability):
    """Sets up a node for cross-node traffic and programs how remote pod CIDRs are reached.

    Built from a `pylium.api.context.RoutingContext`; the routing mode never talks to the KV
    store itself. `setup_node` returns nothing."""
