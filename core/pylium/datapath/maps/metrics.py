"""Mirror of the `metrics` per-CPU hash (bpf/lib/metrics.h) and the reason names."""

from __future__ import annotations

import ctypes

#: reason 0 = forwarded; the others are Cilium drop reasons (pkg/monitor/api/drop.go)
REASONS = {
    0: "Forwarded",
    132: "Invalid source ip",
    133: "Policy denied",
    134: "Invalid packet",
    139: "Unsupported L3 protocol",
    141: "Error writing to packet",
    152: "No matching local container found",
    157: "IP fragmentation not supported",
    165: "No configuration available to perform policy decision",
    181: "Policy denied by denylist",
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
