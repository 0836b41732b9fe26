"""Synthesized packets for BPF_PROG_TEST_RUN (trace, tests, benchmarks)."""

from __future__ import annotations

import ctypes
import ipaddress
import struct

from pylium.policy.mapstate import PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP


class SkBuff(ctypes.Structure):
    """Kernel `struct __sk_buff` up to `tc_classid` (the part BPF_PROG_TEST_RUN reads/writes)."""

    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32),
                ("mark", ctypes.c_uint32), ("queue_mapping", ctypes.c_uint32),
                ("protocol", ctypes.c_uint32), ("vlan_present", ctypes.c_uint32),
                ("vlan_tci", ctypes.c_uint32), ("vlan_proto", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("ingress_ifindex", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("tc_index", ctypes.c_uint32),
                ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
                ("tc_classid", ctypes.c_uint32)]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build(src_ip: str, dst_ip: str, proto: int, sport: int = 0, dport: int = 0,
          src_mac: bytes = b"\x02\0\0\0\0\x01", dst_mac: bytes = b"\x02\0\0\0\0\x02",
          tcp_flags: int = 0x02, icmp_code: int = 0, payload: bytes = b"") -> bytes:
    """An Ethernet/IPv4 packet. TCP/UDP/SCTP use sport/dport; ICMP uses dport as the type
    and sport as the echo identifier."""
    if proto == PROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, tcp_flags, 65535, 0, 0)
    elif proto in (PROTO_UDP, PROTO_SCTP):
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        if proto == PROTO_SCTP:
            l4 += b"\0" * 4
    elif proto == PROTO_ICMP:
        l4 = struct.pack("!BBHHH", dport, icmp_code, 0, sport, 1)
    else:
        l4 = b"\0" * 8
    l4 += payload
    total = 20 + len(l4)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                     ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + l4
