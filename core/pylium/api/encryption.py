"""Transparent encryption contract (node-to-node)."""

from __future__ import annotations

from pylium.api.node import NodeCapability
from pylium.errors import UserError


class Encryption(NodeCapability):
    """Built from a `pylium.api.context.EncryptionContext`. `setup_node` returns the public
    key (or key id) this node publishes in its node record ("" publishes none: other nodes
    then treat this node as one without encryption)."""

    def rotate_key(self) -> str:
        """Replace this node's key; returns what to publish instead (`pylium encrypt
        rotate`). Peers follow through the node event the new record causes."""
        raise UserError(f"encryption {self.name!r} cannot rotate its key")
