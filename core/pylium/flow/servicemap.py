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
    """Nodes and edges from flow records. An edge counts connections (5-tuples): one is
    dropped if any observation point dropped it; reply packets are left out."""
    nodes: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        key = f"{ep.namespace}/{ep.name}"
        nodes[key] = {"id": key, "label": ep.name, "namespace": ep.namespace,
                      "identity": ep.identity, "endpoint": True}
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    #: per edge, per connection (5-tuple): did any observation point drop it?
    conns: dict[tuple[str, str, str], dict[tuple, bool]] = {}
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
        ekey = (src, dst, port)
        edge = edges.get(ekey)
        if edge is None:
            edge = edges[ekey] = {"from": src, "to": dst, "port": port, "flows": 0}
            conns[ekey] = {}
        edge["flows"] += 1
        edge["last_time_ns"] = f.time_ns
        conn = (f.src_ip, f.dst_ip, f.sport, f.dport, f.protocol)
        # a connection allowed on the sender's egress but dropped at the receiver is dropped
        conns[ekey][conn] = conns[ekey].get(conn, False) or f.verdict == "DROPPED"
    out_edges = []
    for ekey, edge in edges.items():
        dropped = sum(conns[ekey].values())
        forwarded = len(conns[ekey]) - dropped
        edge["forwarded"], edge["dropped"] = forwarded, dropped
        edge["verdict"] = ("DROPPED" if not forwarded else "FORWARDED" if not dropped
                           else "MIXED")
        out_edges.append(edge)
    out_edges.sort(key=lambda e: (e["from"], e["to"], e["port"]))
    return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": out_edges}
