"""Mirror of the `endpoints` map (bpf/lib/endpoints.h): pod IPv4 -> endpoint."""

from __future__ import annotations

import ctypes
import ipaddress


class EndpointKey(ctypes.Structure):
    """C `struct endpoint_key` (bpf/lib/endpoints.h)."""

    _fields_ = [("ip4", ctypes.c_uint8 * 4)]

    @classmethod
    def of(cls, ip: str) -> EndpointKey:
        return cls((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(ip).packed))

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Address(bytes(self.ip4)))


class EndpointInfoValue(ctypes.Structure):
    """C `struct endpoint_info` (bpf/lib/endpoints.h)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("ep_id", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("identity", ctypes.c_uint32),
                ("mac", ctypes.c_uint8 * 6), ("host_mac", ctypes.c_uint8 * 6)]


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))
