"""The node lifecycle that routing modes and encryption share: set this node up, follow the
other nodes as they join and leave, tear down when deselected, and let go of handles when the
agent stops (what was set up keeps carrying traffic across an agent restart)."""

from __future__ import annotations

import abc
import ipaddress
from typing import Any

import attrs


@attrs.frozen
class NodeInfo:
    """A node as the cluster sees it (what agents register in the KV store)."""

    name: str
    ipv4: ipaddress.IPv4Address = attrs.field(converter=ipaddress.IPv4Address)
    pod_cidr: ipaddress.IPv4Network = attrs.field(converter=ipaddress.IPv4Network)
    labels: dict[str, str] = attrs.field(factory=dict)
    encryption_key: str = ""



class NodeCapability(abc.ABC):
    name: str = ""
    #: bytes of per-packet overhead on the wire; the pod MTU is the underlay MTU minus the
    #: overheads of the selected routing mode and encryption
    mtu_overhead: int = 0

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        self.context = context
        self.options = dict(options if options is not None else getattr(context, "options", {}))

    @classmethod
    def from_context(cls, context: Any) -> NodeCapability:
        """How the core builds the backend (see `pylium.api.context`)."""
        return cls(context, dict(context.options))

    @abc.abstractmethod
    def setup_node(self, local: NodeInfo) -> Any: ...

    @abc.abstractmethod
    def node_joined(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def node_left(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def teardown(self) -> None:
        """Undo `setup_node` and every node (deselection, lab down)."""

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to drop
        """Agent stop: drop fds and handles only; nothing stops carrying traffic."""

    def status(self) -> dict[str, Any]:
        return {}
