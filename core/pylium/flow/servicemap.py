"""The service map: endpoints as nodes, observed flows as edges, for the UI page."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pylium.flow.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Flow, Peer, is_non_ipv4

PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_ICMP: "ICMP"}


def node_key(peer: Peer, ip: str, identity: int) -> str:
    if peer.pod_name:
        return f"{peer.namespace}/{peer.pod_name}" if peer.namespace else peer.pod_name
    if identity:
        return f"identity:{identity}"
    return ip


def build_graph(records: Iterable[Any], endpoints: Iterable[Any] = ()) -> dict[str, Any]:
    """Nodes and edges from flow records (reply packets fold into their request's edge)."""
    nodes: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        key = f"{ep.namespace}/{ep.name}"
        nodes[key] = {"id": key, "label": ep.name, "namespace": ep.namespace,
                      "identity": ep.identity, "endpoint": True}
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    for f in records:
        if type(f) is not Flow or f.is_reply or is_non_ipv4(f):
            continue
        src = node_key(f.source, f.src_ip, f.src_identity)
        dst = node_key(f.destination, f.dst_ip, f.dst_identity)
        for key, peer, ident in ((src, f.source, f.src_identity),
                                 (dst, f.destination, f.dst_identity)):
            if key not in nodes:
                nodes[key] = {"id": key, "label": peer.pod_name or key,
                              "namespace": peer.namespace, "identity": ident,
                              "endpoint": False}
        proto = PROTO_NAMES.get(f.protocol, str(f.protocol))
        port = f"{f.dport}/{proto}" if f.protocol in (PROTO_TCP, PROTO_UDP) else proto
        edge = edges.get((src, dst, port))
        if edge is None:
            edge = edges[(src, dst, port)] = {"from": src, "to": dst, "port": port,
                                              "forwarded": 0, "dropped": 0, "other": 0}
        if f.verdict == "FORWARDED":
            edge["forwarded"] += 1
        elif f.verdict == "DROPPED":
            edge["dropped"] += 1
        else:
            edge["other"] += 1
        edge["last_verdict"] = f.verdict
        edge["last_time_ns"] = f.time_ns
    out_edges = []
    for edge in edges.values():
        if edge["dropped"] and not edge["forwarded"]:
            edge["verdict"] = "DROPPED"
        elif edge["forwarded"] and not edge["dropped"]:
            edge["verdict"] = "FORWARDED"
        else:
            edge["verdict"] = "MIXED" if edge["dropped"] else edge["last_verdict"]
        out_edges.append(edge)
    out_edges.sort(key=lambda e: (e["from"], e["to"], e["port"]))
    return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": out_edges}
