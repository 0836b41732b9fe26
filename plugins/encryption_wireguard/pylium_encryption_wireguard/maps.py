"""Mirror of the plugin's `wg_nodes` LPM trie (bpf/bpf_wireguard.c): a remote node's pod CIDR
-> its underlay address and whether it is a WireGuard peer."""

from __future__ import annotations

import ctypes
import ipaddress

WG_NODE_F_PEER = 0x01


class WgNodeKey(ctypes.Structure):
    """C `struct wg_node_key` (bpf_wireguard.c)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("ip4", ctypes.c_uint8 * 4)]

    @classmethod
    def of(cls, cidr: str) -> WgNodeKey:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(net.prefixlen, (ctypes.c_uint8 * 4)(*net.network_address.packed))

    @property
    def cidr(self) -> str:
        return str(ipaddress.IPv4Network((bytes(self.ip4), self.prefixlen), strict=False))


class WgNode(ctypes.Structure):
    """C `struct wg_node` (bpf_wireguard.c)."""

    _fields_ = [("node_ip", ctypes.c_uint8 * 4), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]

    @classmethod
    def of(cls, node_ip: str, peer: bool) -> WgNode:
        packed = ipaddress.IPv4Address(node_ip).packed
        return cls((ctypes.c_uint8 * 4)(*packed), WG_NODE_F_PEER if peer else 0)
