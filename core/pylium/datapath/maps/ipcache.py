"""Mirror of the `ipcache` LPM trie (bpf/lib/ipcache.h): prefix -> identity, tunnel endpoint."""

from __future__ import annotations

import ctypes
import ipaddress


class IpcacheKey(ctypes.Structure):
    """C `struct ipcache_key` (bpf/lib/ipcache.h)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("ip4", ctypes.c_uint8 * 4)]

    @classmethod
    def of(cls, cidr: str) -> IpcacheKey:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(net.prefixlen, (ctypes.c_uint8 * 4)(*net.network_address.packed))

    @property
    def cidr(self) -> str:
        return str(ipaddress.IPv4Network((bytes(self.ip4), self.prefixlen), strict=False))


class RemoteEndpointInfo(ctypes.Structure):
    """C `struct remote_endpoint_info` (bpf/lib/ipcache.h)."""

    _fields_ = [("identity", ctypes.c_uint32), ("tunnel_endpoint", ctypes.c_uint8 * 4),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]
