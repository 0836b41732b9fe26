"""Star Wars demo traffic as real `struct pylium_event` bytes, and a resolver like the
agent's (endpoint id / IP → pod, identity → labels)."""

from __future__ import annotations

import time

from pylium.flow.decode import encode_event
from pylium.flow.model import EVENT_DROP, EVENT_POLICY_VERDICT, EVENT_TRACE, Peer

PODS = {
    # ip: (endpoint id, identity, pod, labels)
    "10.200.0.10": (11, 1001, "deathstar", ("k8s:class=deathstar", "k8s:org=empire")),
    "10.200.0.11": (12, 1002, "tiefighter", ("k8s:class=tiefighter", "k8s:org=empire")),
    "10.200.0.12": (13, 1003, "xwing", ("k8s:class=xwing", "k8s:org=alliance")),
}
BY_ID = {v[1]: (ip, *v) for ip, v in PODS.items()}


def starwars_resolver(ip: str, identity: int, ep_id: int) -> Peer | None:
    entry = BY_ID.get(identity)
    if entry is None:
        return None
    _ip, epid, ident, pod, labels = entry
    return Peer(ID=epid if ep_id else 0, identity=ident, namespace="default",
                labels=labels + ("k8s:io.kubernetes.pod.namespace=default",), pod_name=pod)


def starwars_events(now_ns: int | None = None) -> list[bytes]:
    """tiefighter → deathstar:80 allowed + delivered; xwing → deathstar:80 denied + dropped,
    as deathstar's ingress program would report them."""
    ts = time.monotonic_ns() if now_ns is None else now_ns
    common = dict(direction=0, ep_id=11, dst_identity=1001, daddr="10.200.0.10", dport=80,
                  protocol=6, tcp_flags=0x02, ifindex=7, pkt_len=60)
    tie = dict(common, src_identity=1002, saddr="10.200.0.11", sport=40000)
    xw = dict(common, src_identity=1003, saddr="10.200.0.12", sport=43210)
    return [
        encode_event(ts_ns=ts, type=EVENT_POLICY_VERDICT, reason=1, flags=2, **tie),
        encode_event(ts_ns=ts + 1000, type=EVENT_TRACE, reason=0, flags=2, **tie),
        encode_event(ts_ns=ts + 2000, type=EVENT_POLICY_VERDICT, reason=2, **xw),
        encode_event(ts_ns=ts + 3000, type=EVENT_DROP, reason=133, **xw),
    ]
