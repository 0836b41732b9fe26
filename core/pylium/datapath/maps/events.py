"""Mirror of `struct pylium_event` (bpf/lib/events.h): the 64-byte ring-buffer record."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import Any

from pylium.datapath.maps.metrics import reason_name

EVENT_DROP = 1
EVENT_TRACE = 2
EVENT_POLICY_VERDICT = 3
TYPE_NAMES = {EVENT_DROP: "drop", EVENT_TRACE: "trace", EVENT_POLICY_VERDICT: "policy-verdict"}
TRACE_POINTS = {0: "to-endpoint", 3: "to-stack", 5: "from-endpoint"}
VERDICTS = {1: "allow", 2: "deny", 3: "redirect"}
EVENT_F_REPLY = 0x01
EVENT_F_CT_NEW = 0x02
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


class Event(ctypes.Structure):
    """C `struct pylium_event` (bpf/lib/events.h), 64 bytes."""

    _fields_ = [("ts_ns", ctypes.c_uint64), ("type", ctypes.c_uint8),
                ("reason", ctypes.c_uint8), ("direction", ctypes.c_uint8),
                ("flags", ctypes.c_uint8), ("ep_id", ctypes.c_uint16),
                ("proxy_port", ctypes.c_uint16), ("src_identity", ctypes.c_uint32),
                ("dst_identity", ctypes.c_uint32), ("saddr", ctypes.c_uint8 * 4),
                ("daddr", ctypes.c_uint8 * 4), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("protocol", ctypes.c_uint8),
                ("tcp_flags", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("ifindex", ctypes.c_uint32), ("pkt_len", ctypes.c_uint32),
                ("rev_nat", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("pad3", ctypes.c_uint32), ("pad4", ctypes.c_uint64)]


def decode(raw: bytes) -> dict[str, Any]:
    """One record as a plain dict (ports in host order)."""
    e = Event.from_buffer_copy(raw[:ctypes.sizeof(Event)])
    dport = socket.ntohs(e.dport)
    out: dict[str, Any] = {
        "ts_ns": e.ts_ns, "type": TYPE_NAMES.get(e.type, str(e.type)),
        "direction": "egress" if e.direction else "ingress",
        "is_reply": bool(e.flags & EVENT_F_REPLY), "ct_new": bool(e.flags & EVENT_F_CT_NEW),
        "ep_id": e.ep_id, "src_identity": e.src_identity, "dst_identity": e.dst_identity,
        "saddr": str(ipaddress.IPv4Address(bytes(e.saddr))),
        "daddr": str(ipaddress.IPv4Address(bytes(e.daddr))),
        "sport": socket.ntohs(e.sport), "dport": dport,
        "protocol": PROTOCOLS.get(e.protocol, str(e.protocol)),
        "tcp_flags": e.tcp_flags, "ifindex": e.ifindex, "pkt_len": e.pkt_len,
        "rev_nat": e.rev_nat,
    }
    if e.type == EVENT_DROP:
        out["reason"] = e.reason
        out["reason_desc"] = reason_name(e.reason)
    elif e.type == EVENT_TRACE:
        out["observation_point"] = TRACE_POINTS.get(e.reason, str(e.reason))
    else:
        out["verdict"] = VERDICTS.get(e.reason, str(e.reason))
        out["proxy_port"] = e.proxy_port
    if e.protocol == 1:
        out["icmp_type"], out["icmp_code"] = dport >> 8, dport & 0xFF
    return out
