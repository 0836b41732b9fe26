"""Mirrors of the service load-balancing maps (bpf/lib/lb.h). Addresses and ports are in
network byte order, as the programs compare them with packet fields."""

from __future__ import annotations

import ctypes
import ipaddress

SVC_F_NODEPORT = 0x01
SVC_F_LOCAL = 0x02
SVC_F_AFFINITY = 0x04
LB_ALG_RANDOM = 0
LB_ALG_MAGLEV = 1
ALGORITHMS = {"random": LB_ALG_RANDOM, "maglev": LB_ALG_MAGLEV}
#: Cilium's BackendState numbering
BACKEND_STATES = {"active": 0, "terminating": 1, "quarantined": 2, "maintenance": 3}
#: BPF_F_INNER_MAP: inner maps of one outer map may differ in max_entries
BPF_F_INNER_MAP = 0x1000
#: source of hairpinned service traffic (Cilium's IPV4_LOOPBACK)
LB_LOOPBACK_IP = "169.254.42.1"


def _ip4(ip: str):
    return (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(ip).packed)


def _be16(port: int):
    return (ctypes.c_uint8 * 2)(*port.to_bytes(2, "big"))


def _ip_str(raw) -> str:
    return str(ipaddress.IPv4Address(bytes(raw)))


def _port(raw) -> int:
    return int.from_bytes(bytes(raw), "big")


class Lb4Key(ctypes.Structure):
    """C `struct lb4_key` (bpf/lib/lb.h): service frontend and slot (0 = master)."""

    _fields_ = [("address", ctypes.c_uint8 * 4), ("dport", ctypes.c_uint8 * 2),
                ("backend_slot", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("scope", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 2)]

    @classmethod
    def of(cls, ip: str, port: int, proto: int, slot: int = 0) -> Lb4Key:
        return cls(_ip4(ip), _be16(port), slot, proto, 0)

    @property
    def ip(self) -> str:
        return _ip_str(self.address)

    @property
    def port(self) -> int:
        return _port(self.dport)


class Lb4Service(ctypes.Structure):
    """C `struct lb4_service` (bpf/lib/lb.h). Master entry: `backend_id` holds the
    affinity timeout in seconds, `count` the number of backend slots."""

    _fields_ = [("backend_id", ctypes.c_uint32), ("count", ctypes.c_uint16),
                ("rev_nat_index", ctypes.c_uint16), ("flags", ctypes.c_uint8),
                ("algorithm", ctypes.c_uint8), ("pad", ctypes.c_uint16),
                ("lut_size", ctypes.c_uint32)]


class Lb4Backend(ctypes.Structure):
    """C `struct lb4_backend` (bpf/lib/lb.h)."""

    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint8 * 2),
                ("proto", ctypes.c_uint8), ("flags", ctypes.c_uint8)]

    @classmethod
    def of(cls, ip: str, port: int, proto: int, state: int = 0) -> Lb4Backend:
        return cls(_ip4(ip), _be16(port), proto, state)

    @property
    def ip(self) -> str:
        return _ip_str(self.address)

    @property
    def port_value(self) -> int:
        return _port(self.port)


class Lb4ReverseNat(ctypes.Structure):
    """C `struct lb4_reverse_nat` (bpf/lib/lb.h)."""

    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint8 * 2),
                ("pad", ctypes.c_uint16)]

    @classmethod
    def of(cls, ip: str, port: int) -> Lb4ReverseNat:
        return cls(_ip4(ip), _be16(port), 0)


class Lb4AffinityKey(ctypes.Structure):
    """C `struct lb4_affinity_key` (bpf/lib/lb.h)."""

    _fields_ = [("client_ip", ctypes.c_uint8 * 4), ("rev_nat_index", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class Lb4AffinityVal(ctypes.Structure):
    """C `struct lb4_affinity_val` (bpf/lib/lb.h)."""

    _fields_ = [("last_used_ns", ctypes.c_uint64), ("backend_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class Lb4SockKey(ctypes.Structure):
    """C `struct lb4_sock_key` (bpf/lib/lb.h): a socket (cookie) and its backend."""

    _fields_ = [("cookie", ctypes.c_uint64), ("address", ctypes.c_uint8 * 4),
                ("port", ctypes.c_uint8 * 2), ("pad", ctypes.c_uint16)]


class Lb4SockVal(ctypes.Structure):
    """C `struct lb4_sock_val` (bpf/lib/lb.h): the service address the socket asked for."""

    _fields_ = [("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint8 * 2),
                ("rev_nat_index", ctypes.c_uint16)]


class U16Key(ctypes.Structure):
    """A bare `__u16` key (the rev-NAT index)."""

    _fields_ = [("value", ctypes.c_uint16)]
