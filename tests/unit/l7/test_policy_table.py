"""The agent -> proxy policy JSON and the proxy's lookup: the key the datapath would pick
(specific identity before wildcard, longest port prefix) gives the grants."""

from __future__ import annotations

from pylium.datapath.marks import mark_decode_identity, mark_encode_identity
from pylium.l7.proxy import PolicyTable
from pylium.l7.supervisor import policy_message
from pylium.policy.http import PortRuleHTTP
from pylium.policy.mapstate import Direction, PolicyKey
from pylium.policy.resolve import L7Grant
from pylium_l7_http.parser import HttpParserFactory

TCP = 6


def table(entries, ipcache=()):
    snapshot = [{"ep_id": 3, "ipv4": "10.0.0.2", "identity": 1000, "entries": entries}]
    t = PolicyTable(HttpParserFactory())
    problems = t.load(policy_message(snapshot, "http", ipcache, revision=5))
    assert problems == []
    return t


def test_specific_identity_beats_wildcard_and_other_ports_get_nothing():
    get = L7Grant("ns/a[0]", "http", (PortRuleHTTP(method="GET"),))
    post = L7Grant("ns/b[0]", "http", (PortRuleHTTP(method="POST"),))
    t = table([(PolicyKey(0, Direction.INGRESS, TCP, 80, 16), (get,)),
               (PolicyKey(2000, Direction.INGRESS, TCP, 80, 16), (get, post))])
    assert t.revision == 5 and t.redirects == 2
    grants = t.grants("ingress", "10.0.0.2", 2000, 80)
    assert [g.rule for g in grants] == ["ns/a[0]", "ns/b[0]"]
    assert grants[1].rules == (PortRuleHTTP(method="POST"),)
    assert [g.rule for g in t.grants("ingress", "10.0.0.2", 3000, 80)] == ["ns/a[0]"]
    assert t.grants("ingress", "10.0.0.2", 2000, 81) is None
    assert t.grants("egress", "10.0.0.2", 2000, 80) is None
    assert t.grants("ingress", "10.0.0.9", 2000, 80) is None


def test_allow_all_grant_and_other_protocols():
    t = table([(PolicyKey(0, Direction.EGRESS, TCP, 8080, 16),
                (L7Grant("l4", allow_all=True), L7Grant("h", "http", (PortRuleHTTP(),)))),
               (PolicyKey(0, Direction.EGRESS, TCP, 9092, 16),
                (L7Grant("k", "kafka", ()),))])
    grants = t.grants("egress", "10.0.0.2", 7, 8080)
    assert grants[0].allow_all
    assert t.grants("egress", "10.0.0.2", 7, 9092) is None  # not an http key


def test_identities_from_endpoints_and_longest_prefix_of_the_table():
    t = table([], ipcache=[("10.1.0.0/16", 300), ("10.1.2.0/24", 400), ("10.1.2.3/32", 500)])
    assert t.identity_of("10.0.0.2") == 1000      # the local endpoint
    assert t.identity_of("10.1.2.3") == 500
    assert t.identity_of("10.1.2.4") == 400
    assert t.identity_of("10.1.9.9") == 300
    assert t.identity_of("192.0.2.1") == 2        # world


def test_bad_rules_deny_instead_of_allowing():
    snapshot = [{"ep_id": 3, "ipv4": "10.0.0.2", "identity": 1000, "entries": []}]
    message = policy_message(snapshot, "http")
    message["endpoints"][0]["entries"] = [{
        "identity": 0, "direction": "ingress", "protocol": 6, "port": 80,
        "port_prefix_len": 16, "grants": [{"rule": "bad", "kind": "http", "allow_all": False,
                                            "rules": [{"header_matches": [
                                                {"name": "X", "mismatch": "ADD"}]}]}]}]
    t = PolicyTable(HttpParserFactory())
    problems = t.load(message)
    assert problems and "mismatch" in problems[0]
    assert t.grants("ingress", "10.0.0.2", 1, 80) == ()  # key known, nothing allowed


def test_mark_twin_round_trips_and_sets_the_magic():
    for identity in (1, 2, 256, 1000, 65535, 65536, 0xABCDEF):
        mark = mark_encode_identity(identity)
        assert mark & 0x0F00 == 0x0F00
        assert mark_decode_identity(mark) == identity
    assert mark_encode_identity(0x123456) == 0x34560F12
