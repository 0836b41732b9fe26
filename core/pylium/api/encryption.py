"""Transparent encryption contract (node-to-node)."""

from __future__ import annotations

import abc
from typing import Any

from pylium.api.routing import NodeInfo


class Encryption(abc.ABC):
    name: str = ""
    #: bytes of per-packet overhead added on the wire
    mtu_overhead: int = 0

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        self.context = context
        self.options = dict(options or {})

    @abc.abstractmethod
    def setup_node(self, local: NodeInfo) -> str:
        """Prepare this node; returns the public key (or key id) to publish in NodeInfo."""

    @abc.abstractmethod
    def node_joined(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def node_left(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def teardown(self) -> None: ...
