"""Mirror of the `metrics` per-CPU hash (bpf/lib/metrics.h) and the reason names."""

from __future__ import annotations

import ctypes

#: reason 0 = forwarded; the others are Cilium drop reasons, with Cilium's wording
#: (pkg/monitor/api/drop.go); the flow layer prints the same text
REASONS = {
    0: "Forwarded",
    130: "Invalid source mac", 131: "Invalid destination mac", 132: "Invalid source ip",
    133: "Policy denied", 134: "Invalid packet", 135: "CT: Truncated or invalid header",
    136: "CT: Missing TCP ACK flag", 137: "CT: Unknown L4 protocol",
    138: "CT: Can't create entry from packet", 139: "Unsupported L3 protocol",
    140: "Missed tail call", 141: "Error writing to packet", 142: "Unknown L4 protocol",
    143: "Unknown ICMPv4 code", 144: "Unknown ICMPv4 type", 151: "Stale or unroutable IP",
    152: "No matching local container found", 155: "CT: Map insertion failed",
    157: "IP fragmentation not supported",
    158: "Service backend not found", 160: "No tunnel/encapsulation endpoint (datapath BUG!)",
    165: "No configuration available to perform policy decision",
    169: "FIB lookup failed", 171: "Invalid identity", 178: "Socket lookup failed",
    179: "Socket assign failed", 180: "Proxy redirection not supported for protocol",
    181: "Policy denied by denylist",
    189: "Authentication required", 196: "TTL exceeded", 203: "Endpoint policy program not available",
    220: "Unencrypted traffic to a node without encryption key",
}


def reason_name(code: int) -> str:
    return REASONS.get(code, str(code))


class MetricsKey(ctypes.Structure):
    """C `struct metrics_key` (bpf/lib/metrics.h)."""

    _fields_ = [("reason", ctypes.c_uint8), ("direction", ctypes.c_uint8),
                ("pad", ctypes.c_uint16)]


class MetricsValue(ctypes.Structure):
    """C `struct metrics_value` (bpf/lib/metrics.h)."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class U32Key(ctypes.Structure):
    """C `__u32` key (policy outer map, events_lost)."""

    _fields_ = [("value", ctypes.c_uint32)]


class U64Value(ctypes.Structure):
    """C `__u64` value (events_lost)."""

    _fields_ = [("value", ctypes.c_uint64)]
