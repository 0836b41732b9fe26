"""Kubernetes Node objects → the agent's node registry (`context.nodes`), source
"kubernetes": the same joined/left callbacks the KV store's node records drive (routing
mode, encryption, the ipcache), so `pylium node list` shows the cluster's nodes with their
addresses and pod CIDRs. A node an agent also registered in the KV store is taken from
there (its record carries the encryption key); the Node object fills in where no agent
published one.

A Node needs an IPv4 address (InternalIP first, as the API server's
`--kubelet-preferred-address-types` does, then ExternalIP) and an IPv4 pod CIDR
(`spec.podCIDR`, set by the controller manager's node IPAM or by hand); until it has both
it is listed under `waiting` in the orchestrator's status, not in the registry."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pylium.api import NodeInfo

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def node_info(node: dict[str, Any]) -> tuple[NodeInfo | None, str, dict[str, Any]]:
    """(NodeInfo or None, why not, extra fields for `pylium node list`) of a Node object."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    name = meta.get("name") or ""
    addresses = [a for a in status.get("addresses") or [] if isinstance(a, dict)]
    ipv4 = None
    for kind in ADDRESS_TYPES:
        for address in addresses:
            if address.get("type") == kind and ipv4 is None:
                try:
                    ipv4 = str(ipaddress.IPv4Address(str(address.get("address"))))
                except ValueError:
                    continue
    cidrs = [spec.get("podCIDR")] + list(spec.get("podCIDRs") or [])
    pod_cidr = None
    for cidr in cidrs:
        try:
            pod_cidr = str(ipaddress.IPv4Network(str(cidr)))
            break
        except ValueError:
            continue
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [] if isinstance(c, dict))
    extra = {"addresses": [f"{a.get('type')}={a.get('address')}" for a in addresses],
             "ready": ready}
    if ipv4 is None:
        return None, "no IPv4 InternalIP or ExternalIP address", extra
    if pod_cidr is None:
        return None, "no IPv4 spec.podCIDR", extra
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    return NodeInfo(name=name, ipv4=ipv4, pod_cidr=pod_cidr, labels=labels), "", extra


class NodeSync:
    """Node events → `registry.set_external` / `remove_external`."""

    def __init__(self, registry: Any):
        self.registry = registry
        #: nodes left out, and why
        self.waiting: dict[str, str] = {}

    def on_node(self, event: str, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name") or ""
        if not name:
            return
        if event == "DELETED":
            self.waiting.pop(name, None)
            self.registry.remove_external(SOURCE, name)
            return
        info, why, extra = node_info(obj)
        if info is None:
            if self.waiting.get(name) != why:
                log.info("node %s not in the node registry yet: %s", name, why)
            self.waiting[name] = why
            self.registry.remove_external(SOURCE, name)
            return
        self.waiting.pop(name, None)
        self.registry.set_external(SOURCE, info, **extra)

    def status(self) -> dict[str, Any]:
        return {"nodes": sorted(self.registry.external(SOURCE)), "waiting": dict(self.waiting)}
