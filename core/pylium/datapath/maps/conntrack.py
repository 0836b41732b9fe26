"""Mirror of the `conntrack` LRU hash (bpf/lib/conntrack.h)."""

from __future__ import annotations

import ctypes

CT_F_SEEN_REPLY = 0x01
CT_F_CLOSING = 0x02
CT_F_LOOPBACK = 0x04
#: `CtKey.direction` of service-scope entries (the backend chosen for a flow to a VIP)
CT_DIR_SERVICE = 2


class CtKey(ctypes.Structure):
    """C `struct ct_key` (bpf/lib/conntrack.h); addresses and ports in network order."""

    _fields_ = [("saddr", ctypes.c_uint8 * 4), ("daddr", ctypes.c_uint8 * 4),
                ("sport", ctypes.c_uint8 * 2), ("dport", ctypes.c_uint8 * 2),
                ("protocol", ctypes.c_uint8), ("direction", ctypes.c_uint8),
                ("pad", ctypes.c_uint16)]


class CtEntry(ctypes.Structure):
    """C `struct ct_entry` (bpf/lib/conntrack.h)."""

    _fields_ = [("expires_ns", ctypes.c_uint64), ("packets", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64), ("src_identity", ctypes.c_uint32),
                ("policy_rev", ctypes.c_uint32), ("ep_id", ctypes.c_uint16),
                ("proxy_port", ctypes.c_uint16), ("flags", ctypes.c_uint8),
                ("tcp_flags_seen", ctypes.c_uint8), ("rev_nat_index", ctypes.c_uint16),
                ("backend_id", ctypes.c_uint32), ("nat_addr", ctypes.c_uint8 * 4)]
