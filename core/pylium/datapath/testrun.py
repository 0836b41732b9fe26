"""Running the endpoint programs on synthesized packets (BPF_PROG_TEST_RUN) and reading what
they decided: `pylium bpf trace`, the scenario tests and the policy-lookup bench.

A dry run marks the packet (skb->mark and cb[2]) so the programs write no conntrack, events
or metrics; it may impose the source identity (cb[0], cb[1]). The programs report back in
the context's cb[]: drop reason, verdict | proxy port << 16, peer identity, CT state,
redirect target."""

from __future__ import annotations

from typing import Any

from pylium.datapath import libbpf
from pylium.datapath.maps.events import PROTOCOLS
from pylium.datapath.maps.metrics import reason_name
from pylium.datapath.packet import SkBuff, build
from pylium.errors import UserError
from pylium.policy.mapstate import PROTOCOL_NUMBERS, Direction

MARK_MAGIC_DRYRUN = 0x0D00
TRACE_CB_IDENTITY = 0x70796C6D
TRACE_CB_DRYRUN = 0x64727972
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TC_ACTIONS = {TC_ACT_OK: "forwarded", TC_ACT_SHOT: "dropped", TC_ACT_REDIRECT: "redirected"}
CT_STATES = {0: "new", 1: "established", 2: "reply"}
#: CB_RESULT_TARGET of a packet the program sent to the L7 proxy (bpf/lib/proxy.h)
TARGET_PROXY = 0xFFFFFFFF
VERDICT_NAMES = {0: None, 1: "allowed", 2: "denied", 3: "redirected"}


def run_program(prog_fd: int, packet: bytes, ifindex: int, mark: int = 0, repeat: int = 1,
                dry_run: bool = False, src_identity: int | None = None,
                ingress_ifindex: int = 0) -> tuple[int, SkBuff, int]:
    """BPF_PROG_TEST_RUN of one program: (retval, ctx out, ns per run). `ingress_ifindex`
    0 = a packet sent by a socket of the node, else the interface it was received on."""
    ctx = SkBuff(mark=mark, ifindex=ifindex, ingress_ifindex=ingress_ifindex)
    if dry_run:
        ctx.mark = MARK_MAGIC_DRYRUN
        ctx.cb[2] = TRACE_CB_DRYRUN
        if src_identity is not None:
            ctx.cb[0], ctx.cb[1] = src_identity, TRACE_CB_IDENTITY
    retval, duration, _data, ctx_out = libbpf.test_run(prog_fd, packet, ctx, repeat=repeat)
    return retval, ctx_out, duration


def parse_direction(direction: Direction | str) -> Direction:
    if not isinstance(direction, str):
        return Direction(direction)
    try:
        return Direction[direction.upper()]
    except KeyError:
        raise UserError(f"direction: {direction!r} is not ingress or egress") from None


def parse_protocol(proto: int | str) -> int:
    if isinstance(proto, str):
        proto = PROTOCOL_NUMBERS.get(proto.upper(), -1)
    if proto not in PROTOCOLS:
        raise UserError(f"proto: {proto} is not ICMP, TCP, UDP or SCTP")
    return proto


def trace_packet(direction: Direction, ep_mac: bytes, host_mac: bytes, src_ip: str,
                 dst_ip: str, sport: int, dport: int, proto: int) -> tuple[str, bytes]:
    """The program that sees a packet of `direction` at the endpoint and the packet as it
    arrives there: (program name, frame)."""
    try:
        if direction == Direction.EGRESS:
            return "from_container", build(src_ip, dst_ip, proto, sport, dport,
                                           src_mac=ep_mac, dst_mac=host_mac)
        return "to_container", build(src_ip, dst_ip, proto, sport, dport,
                                     src_mac=host_mac, dst_mac=ep_mac)
    except (ValueError, OSError) as exc:
        raise UserError(f"trace packet: {exc}") from None


def decode_result(retval: int, ctx: SkBuff, program: str, direction: Direction) -> dict[str, Any]:
    """What the program decided, as `pylium bpf trace` shows it."""
    reason = ctx.cb[0]
    verdict = ctx.cb[1] & 0xFF
    to_proxy = retval != TC_ACT_SHOT and ctx.cb[4] == TARGET_PROXY
    return {
        "program": program, "direction": direction.name.lower(), "retval": retval,
        "action": "to-proxy" if to_proxy else TC_ACTIONS.get(retval, f"tc action {retval}"),
        "verdict": VERDICT_NAMES.get(verdict, str(verdict)),
        "proxy_port": ctx.cb[1] >> 16,
        "drop_reason": reason if retval == TC_ACT_SHOT else 0,
        "drop_reason_desc": reason_name(reason) if retval == TC_ACT_SHOT else "",
        "peer_identity": ctx.cb[2],
        "ct": CT_STATES.get(ctx.cb[3], str(ctx.cb[3])),
        "target_ifindex": 0 if to_proxy else ctx.cb[4],
    }
