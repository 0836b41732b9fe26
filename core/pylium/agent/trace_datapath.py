"""The datapath half of `pylium policy trace --datapath`: ask the loaded BPF programs.

For each side of the traced connection that is a live endpoint on this node, the endpoint's
attached program runs on a synthesized packet with BPF_PROG_TEST_RUN (a dry run: no
conntrack, events or metrics are written) — egress at the source's program, ingress at the
destination's — so the answer comes from the kernel, next to the reference evaluator's."""

from __future__ import annotations

import asyncio
from typing import Any

from pylium.endpoint.component import served_proxy_ports
from pylium.errors import PyliumError
from pylium.policy.trace import TraceResult

#: source port of the synthesized packet, and the stand-in address of a source that has
#: labels but no endpoint here (documentation range: only traced, never sent)
TRACE_SPORT = 40000
UNKNOWN_PEER_IP = "192.0.2.1"


def _live_endpoint(endpoints, identity: int):
    for ep in endpoints.list():
        if ep.identity == identity and ep.state == "ready":
            return ep
    return None


def _combine(sides: dict[str, dict]) -> str:
    actions = [s["action"] for s in sides.values()]
    if "dropped" in actions:
        return "denied"
    if any(s["action"] == "to-proxy" or s.get("verdict") == "redirected" or s.get("proxy_port")
           for s in sides.values()):
        return "redirected"
    return "allowed"


def _proxy_port(sides: dict[str, dict]) -> int | None:
    """The port of the L7 proxy a program sends the connection to (egress side first: a
    flow redirected there never reaches the destination's program)."""
    for side in ("egress", "ingress"):
        if side in sides and sides[side]["action"] == "to-proxy":
            return sides[side]["proxy_port"]
    return None


async def datapath_trace(daemon, result: TraceResult) -> dict[str, Any]:
    datapath = daemon.components.get("datapath")
    endpoints = daemon.components.get("endpoint")
    if datapath is None or endpoints is None:
        raise PyliumError("--datapath needs an agent running the BPF datapath and endpoints")
    query = result.query
    src_ep = _live_endpoint(endpoints, result.src.identity.id) if result.src.endpoint else None
    dst_ep = _live_endpoint(endpoints, result.dst.identity.id) if result.dst.endpoint else None
    src_ip = src_ep.ipv4 if src_ep else (query.src_cidr or UNKNOWN_PEER_IP)
    dst_ip = dst_ep.ipv4 if dst_ep else query.dst_cidr
    sides: dict[str, dict] = {}
    notes: list[str] = []
    if src_ep is not None and dst_ip:
        sides["egress"] = await asyncio.to_thread(
            datapath.trace, src_ep.id, "egress", src_ip, dst_ip, TRACE_SPORT, query.dport,
            query.proto)
        sides["egress"]["endpoint"] = src_ep.id
    elif src_ep is None and result.src.endpoint:
        notes.append("no ready endpoint on this node has the source's identity: egress not traced")
    if dst_ep is not None:
        sides["ingress"] = await asyncio.to_thread(
            datapath.trace, dst_ep.id, "ingress", src_ip, dst_ip, TRACE_SPORT, query.dport,
            query.proto, result.src.identity.id)
        sides["ingress"]["endpoint"] = dst_ep.id
    elif result.dst.endpoint:
        notes.append("no ready endpoint on this node has the destination's identity: "
                     "ingress not traced")
    if not sides:
        return {"verdict": None, "agrees": None, "notes": notes}
    verdict = _combine(sides)
    # the datapath cannot see HTTP: an L7 redirect is its whole answer for such a request
    expected = result.mapstate_verdict.value if query.request is not None else result.result.verdict.value
    if expected == "redirected" and not served_proxy_ports(daemon):
        expected = "denied"
        notes.append("no L7 proxy runs on this node: L7 rules are enforced as deny (fail closed)")
    return {"verdict": verdict, "agrees": verdict == expected, "expected": expected,
            "proxy_port": _proxy_port(sides), **sides, "notes": notes}
