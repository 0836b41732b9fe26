"""EndpointPolicy -> LPM trie entries: the key bytes Cilium's layout prescribes."""

from __future__ import annotations

from pylium.datapath.maps.policy import (
    POLICY_F_DENY,
    PolicyMapKey,
    encode_entry,
    encode_meta,
)
from pylium.policy.mapstate import (
    PROTO_TCP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
)


def test_key_bytes_are_prefixlen_then_big_endian_identity_direction_protocol_port():
    key = PolicyKey(1234, Direction.EGRESS, PROTO_TCP, 0x1F00, 8)
    raw = bytes(PolicyMapKey.of(key))
    assert raw == (56).to_bytes(4, "little") + (1234).to_bytes(4, "big") + bytes([1, 6]) + b"\x1f\x00"


def test_any_protocol_key_has_the_l3_prefix():
    assert PolicyMapKey.of(PolicyKey(0, Direction.INGRESS)).prefixlen == 40


def test_entry_carries_deny_proxy_port_and_its_key_prefix():
    key = PolicyKey(7, Direction.INGRESS, PROTO_TCP, 80, 16)
    allow = encode_entry(key, PolicyEntry(proxy_port=15001))
    deny = encode_entry(key, PolicyEntry(deny=True))
    assert (allow.proxy_port, allow.flags, allow.lpm_prefix_len) == (15001, 0, 64)
    assert deny.flags == POLICY_F_DENY


def test_meta_entry_records_enforcement_and_revision():
    meta = encode_meta(EndpointPolicy(ingress_enforced=True, egress_enforced=False, revision=9))
    assert (meta.flags, meta.revision) == (1, 9)
    assert PolicyMapKey.meta().is_meta and not PolicyMapKey.of(PolicyKey(0, Direction.EGRESS)).is_meta


def test_meta_entry_flags_directions_with_wildcard_entries():
    only_ingress_wildcard = EndpointPolicy(True, True, {
        PolicyKey(0, Direction.INGRESS, PROTO_TCP, 80, 16): PolicyEntry(),
        PolicyKey(5, Direction.EGRESS): PolicyEntry()})
    assert encode_meta(only_ingress_wildcard).flags == 0x01 | 0x02 | 0x04
