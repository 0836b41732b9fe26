"""The agent -> proxy policy JSON and the proxy's lookup: the key the datapath would pick
(specific identity before wildcard, longest port prefix) gives the grants."""

from __future__ import annotations

from pylium.datapath.marks import (
    MARK_MAGIC_IDENTITY,
    MARK_MAGIC_MASK,
    MARK_MAGIC_PROXY_EGRESS,
    mark_decode_identity,
    mark_encode_identity,
)
from pylium.l7.parser import ConnectionInfo
from pylium.l7.proxy import PolicyTable, upstream_mark
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


def test_upstream_mark_carries_the_client_identity_with_the_directions_magic():
    def info(direction, identity):
        return ConnectionInfo(direction=direction, src_ip="10.0.0.1", src_port=1,
                              dst_ip="10.0.0.2", dst_port=80, src_identity=identity,
                              dst_identity=1000)

    ingress = upstream_mark(info("ingress", 0x123456))
    assert ingress == mark_encode_identity(0x123456, MARK_MAGIC_IDENTITY) == 0x34560F12
    egress = upstream_mark(info("egress", 2001))
    assert egress & MARK_MAGIC_MASK == MARK_MAGIC_PROXY_EGRESS
    assert mark_decode_identity(egress) == 2001
    # a CIDR identity (local scope, >= 2**24) does not fit: it goes as world
    assert mark_decode_identity(upstream_mark(info("ingress", 1 << 24))) == 2
