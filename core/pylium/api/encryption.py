"""Transparent encryption contract (node-to-node)."""

from __future__ import annotations

from pylium.api.node import NodeCapability


class Encryption(NodeCapability):
    """Built from a `pylium.api.context.EncryptionContext`. `setup_node` returns the public
    key (or key id) this node publishes in its node record."""
