"""Routing-mode contract: how packets reach pods on other nodes."""

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


class RoutingMode(abc.ABC):
    """Sets up a node for cross-node traffic and programs how remote pod CIDRs are reached.

    `context` is the agent's datapath context (node info, netlink handle, BPF loader);
    the routing mode never talks to the KV store itself."""

    name: str = ""
    #: bytes of per-packet overhead this mode adds; the pod MTU is the underlay MTU minus this
    mtu_overhead: int = 0

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        self.context = context
        self.options = dict(options or {})

    @abc.abstractmethod
    def setup_node(self, local: NodeInfo) -> None: ...

    @abc.abstractmethod
    def node_joined(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def node_left(self, node: NodeInfo) -> None: ...

    @abc.abstractmethod
    def teardown(self) -> None: ...
