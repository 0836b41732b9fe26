"""Mirror of the per-endpoint policy maps (bpf/lib/policy.h) and the encoding of a
`pylium.policy.mapstate.EndpointPolicy` into one inner LPM trie's entries."""

from __future__ import annotations

import ctypes

from pylium.policy.mapstate import FULL_PREFIX_BITS, EndpointPolicy, PolicyEntry, PolicyKey

POLICY_F_DENY = 0x01
META_INGRESS_ENFORCED = 0x01
META_EGRESS_ENFORCED = 0x02
META_INGRESS_WILDCARDS = 0x04
META_EGRESS_WILDCARDS = 0x08
META_IDENTITY = 0xFFFFFFFF
META_DIRECTION = 0xFF
META_PROTOCOL = 0xFF
#: entries one endpoint's inner policy map holds, its meta entry included: C
#: POLICY_ENTRIES_MAX (bpf/lib/policy.h; the layout test checks they agree). Cilium's
#: default policy map size is 16384; pylium's LPM tries are not preallocated, so room costs
#: nothing until used.
POLICY_ENTRIES_MAX = 65536


def entries_needed(policy: EndpointPolicy) -> int:
    """Map entries `policy` takes in an inner map: one per key plus the meta entry."""
    return len(policy.entries) + 1


def _be32(value: int):
    return (ctypes.c_uint8 * 4)(*value.to_bytes(4, "big"))


class PolicyMapKey(ctypes.Structure):
    """C `struct policy_key` (bpf/lib/policy.h). `identity` and `dport` are big-endian
    (read them through `identity_value` and `port`)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("identity", ctypes.c_uint8 * 4),
                ("direction", ctypes.c_uint8), ("protocol", ctypes.c_uint8),
                ("dport", ctypes.c_uint8 * 2)]

    @classmethod
    def of(cls, key: PolicyKey) -> PolicyMapKey:
        return cls(key.lpm_prefixlen, _be32(key.identity), int(key.direction), key.protocol,
                   (ctypes.c_uint8 * 2)(*key.port.to_bytes(2, "big")))

    @classmethod
    def meta(cls) -> PolicyMapKey:
        return cls(FULL_PREFIX_BITS, _be32(META_IDENTITY), META_DIRECTION, META_PROTOCOL,
                   (ctypes.c_uint8 * 2)(0xFF, 0xFF))

    @property
    def port(self) -> int:
        return int.from_bytes(bytes(self.dport), "big")

    @property
    def is_meta(self) -> bool:
        return self.identity_value == META_IDENTITY and self.direction == META_DIRECTION

    @property
    def identity_value(self) -> int:
        return int.from_bytes(bytes(self.identity), "big")


class PolicyMapEntry(ctypes.Structure):
    """C `struct policy_entry` (bpf/lib/policy.h)."""

    _fields_ = [("proxy_port", ctypes.c_uint16), ("flags", ctypes.c_uint8),
                ("lpm_prefix_len", ctypes.c_uint8), ("revision", ctypes.c_uint32)]


def encode_entry(key: PolicyKey, entry: PolicyEntry) -> PolicyMapEntry:
    return PolicyMapEntry(entry.proxy_port, POLICY_F_DENY if entry.deny else 0,
                          key.lpm_prefixlen, 0)


def encode_meta(policy: EndpointPolicy) -> PolicyMapEntry:
    flags = (META_INGRESS_ENFORCED if policy.ingress_enforced else 0) | (
        META_EGRESS_ENFORCED if policy.egress_enforced else 0)
    for key in policy.entries:
        if key.identity == 0:
            flags |= META_INGRESS_WILDCARDS if key.direction == 0 else META_EGRESS_WILDCARDS
    return PolicyMapEntry(0, flags, FULL_PREFIX_BITS, policy.revision & 0xFFFFFFFF)


def key_prefix_to_port_prefix(key: PolicyMapKey) -> int:
    """The port prefix length of an LPM key (0 when the protocol is ANY)."""
    return max(0, key.prefixlen - 48)
