"""Property tests: the map state computed by `resolve` and looked up the way the datapath
does (`mapstate.lookup`) agrees with the reference evaluator on random policies, endpoints
and packets; and rule order never changes the result (Cilium's distillery tests do the
same with permutations of small rule sets)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import Label, LabelSet
from pylium.identity.model import RESERVED_IDENTITIES, Identity
from pylium.policy import evaluate
from pylium.policy.http import PortRuleHTTP
from pylium.policy.l4 import (
    ICMPField,
    ICMPRule,
    IcmpType,
    L7Rules,
    PortDenyRule,
    PortProtocol,
    PortRule,
    PortValue,
    ProtocolName,
)
from pylium.policy.mapstate import Direction, Verdict, lookup
from pylium.policy.resolve import l7_allows, resolve
from pylium.policy.rule import (
    CIDR,
    CIDRRule,
    DefaultDeny,
    EgressDenyRule,
    EgressRule,
    Entity,
    IngressDenyRule,
    IngressRule,
    Rule,
)
from pylium.policy.selector import EndpointSelector, Requirement

NS = "k8s:io.kubernetes.pod.namespace"
LABEL_SETS = [
    LabelSet([Label("k8s", "app", a), Label("k8s", "role", r),
              Label("k8s", "io.kubernetes.pod.namespace", n)])
    for a in ("a", "b") for r in ("x", "y") for n in ("default", "other")
]
ENDPOINT_IDENTITIES = [Identity(256 + i, labels) for i, labels in enumerate(LABEL_SETS)]
PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.168.0.0/24"]
NAMED_PORTS = {"http": 80, "dns": 53}

selectors = st.builds(
    lambda labels, exprs: EndpointSelector(tuple(sorted(labels.items())), tuple(exprs)),
    st.dictionaries(st.sampled_from(["app", "k8s:role", "any:app", NS]),
                    st.sampled_from(["a", "b", "x", "default"]), max_size=2),
    st.lists(st.one_of(
        st.builds(Requirement, st.sampled_from(["app", "role"]), st.sampled_from(["In", "NotIn"]),
                  st.sampled_from([("a",), ("x",), ("a", "b")])),
        st.builds(Requirement, st.sampled_from(["app", NS, "reserved:host"]),
                  st.sampled_from(["Exists", "DoesNotExist"]))), max_size=1),
)
@st.composite
def ports(draw):
    port = draw(st.sampled_from(["0", "80", "80", "81", "53", "443", "http", "dns"]))
    end = 0
    if port.isdigit() and draw(st.integers(0, 3)) == 0:
        end = draw(st.sampled_from([e for e in (90, 1000) if e >= int(port)]))
    proto = draw(st.sampled_from(["TCP", "TCP", "UDP", "ANY", "SCTP"]))
    return PortProtocol(PortValue(port), end, ProtocolName(proto))


http_rules = st.lists(st.builds(PortRuleHTTP, st.sampled_from(["", "GET", "POST"]),
                                st.sampled_from(["", "/a", "/b.*"])), min_size=1, max_size=2)


@st.composite
def port_rules(draw, deny: bool, l7_odds: int):
    pps = tuple(draw(st.lists(ports(), min_size=0, max_size=2)))
    if deny:
        return PortDenyRule(pps)
    if pps and draw(st.integers(0, 99)) < l7_odds:
        l7_ports = tuple(PortProtocol(p.port, 0, ProtocolName("TCP")) for p in pps
                         if p.port != "0")
        if l7_ports:
            return PortRule(l7_ports, L7Rules(http=tuple(draw(http_rules))))
    return PortRule(pps)


cidr_sets = st.builds(lambda c, e: CIDRRule(CIDR(c), tuple(CIDR(x) for x in e)),
                      st.sampled_from(["10.0.0.0/8", "0.0.0.0/0"]),
                      st.sampled_from([(), ("10.1.0.0/16",)]))
icmps = st.builds(lambda t: ICMPRule((ICMPField(IcmpType(t)),)), st.sampled_from([0, 8]))


@st.composite
def items(draw, cls, deny: bool, l7_odds: int):
    ingress = cls in (IngressRule, IngressDenyRule)
    pre = "from" if ingress else "to"
    kwargs = {}
    if draw(st.booleans()):
        kwargs[f"{pre}_endpoints"] = tuple(draw(st.lists(
            st.one_of(st.just(EndpointSelector()), selectors), max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        kwargs[f"{pre}_requires"] = (draw(selectors),)
    if draw(st.integers(0, 3)) == 0:
        kwargs[f"{pre}_cidr"] = tuple(CIDR(c) for c in draw(st.lists(
            st.sampled_from(PREFIXES), max_size=2)))
    if draw(st.integers(0, 3)) == 0:
        kwargs[f"{pre}_cidr_set"] = (draw(cidr_sets),)
    if draw(st.integers(0, 2)) == 0:
        kwargs[f"{pre}_entities"] = tuple(Entity(e) for e in draw(st.lists(st.sampled_from(
            ["all", "world", "cluster", "host", "health", "remote-node"]), max_size=2)))
    choice = draw(st.integers(0, 3))
    if choice == 1:
        kwargs["icmps"] = (draw(icmps),)
    elif choice >= 2:
        kwargs["to_ports"] = tuple(draw(st.lists(port_rules(deny, l7_odds), min_size=1,
                                                 max_size=2)))
    return cls(**kwargs)


@st.composite
def rules(draw, l7_odds: int = 50):
    kw = {"endpoint_selector": draw(st.one_of(st.just(EndpointSelector()), selectors))}
    for name, cls, deny in (("ingress", IngressRule, False),
                            ("ingress_deny", IngressDenyRule, True),
                            ("egress", EgressRule, False),
                            ("egress_deny", EgressDenyRule, True)):
        if draw(st.integers(0, 2)) == 0:
            continue
        kw[name] = tuple(draw(st.lists(items(cls, deny, l7_odds), max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        kw["enable_default_deny"] = DefaultDeny(draw(st.sampled_from([None, True, False])),
                                                draw(st.sampled_from([None, True, False])))
    return Rule(**kw)


def universe(rule_list) -> IdentityCache:
    cache = IdentityCache(ENDPOINT_IDENTITIES)
    for prefix in PREFIXES:
        cache.cidr_identity(prefix)
    return cache


packets = st.tuples(st.sampled_from([6, 6, 17, 132, 1]),
                    st.sampled_from([80, 80, 53, 0, 8, 79, 81, 85, 90, 443, 1000, 8080]))
modes = st.sampled_from(["default", "default", "always", "never"])
requests = st.builds(evaluate.HTTPRequest, st.sampled_from(["GET", "POST", "PUT"]),
                     st.sampled_from(["/a", "/b", "/bc"]))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(rules(), min_size=1, max_size=4), st.sampled_from(LABEL_SETS),
       st.lists(st.tuples(st.integers(0, 20), packets, requests), min_size=1, max_size=6),
       modes)
def test_map_state_agrees_with_reference_evaluator(rule_list, subject, cases, mode):
    check_agreement(rule_list, subject, cases, mode)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(rules(l7_odds=60), min_size=1, max_size=4), st.sampled_from(LABEL_SETS),
       st.lists(st.tuples(st.integers(0, 20), st.tuples(st.just(6), st.sampled_from(
           [80, 80, 80, 81, 53])), requests), min_size=4, max_size=12))
def test_l7_redirects_and_proxy_decisions_agree(rule_list, subject, cases):
    check_agreement(rule_list, subject, cases, "default")


def check_agreement(rule_list, subject, cases, mode):
    cache = universe(rule_list)
    policy = resolve(rule_list, subject, cache, mode=mode, named_ports=NAMED_PORTS)
    # the map-state contract: no allow entry hides under a deny entry of its identity
    denies = [k for k, e in policy.entries.items() if e.deny]
    for key, entry in policy.entries.items():
        if not entry.deny:
            assert not any(d.covers(key) for d in denies), key
    peers = cache.all()
    for pick, (proto, port), request in cases:
        peer = peers[pick % len(peers)]
        for direction in Direction:
            got = lookup(policy, peer.id, direction, proto, port)
            want = evaluate.direction_verdict(rule_list, subject, peer, direction, proto, port,
                                              mode, NAMED_PORTS)
            context = (f"peer={peer.id} {sorted(map(str, peer.labels))} {direction.name} "
                       f"proto={proto} port={port} mode={mode}")
            assert got.verdict == want.verdict, f"{context}: {got} vs {want}"
            event(f"{direction.name} {got.verdict.value}"
                  + (" (deny rule)" if want.rules and got.verdict == Verdict.DENY else ""))
            assert got.proxy_port == want.proxy_port, context
            if got.verdict == Verdict.REDIRECT:
                judged = evaluate.direction_verdict(rule_list, subject, peer, direction,
                                                    proto, port, mode, NAMED_PORTS, request)
                assert l7_allows(policy, got.key, request) == (
                    judged.verdict == Verdict.REDIRECT), context


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(rules(), min_size=2, max_size=3), st.sampled_from(LABEL_SETS), packets, modes)
def test_rule_order_never_changes_the_result(rule_list, subject, packet, mode):
    cache = universe(rule_list)
    baseline = resolve(rule_list, subject, cache, mode=mode, named_ports=NAMED_PORTS)
    peer = cache.all()[hash(packet) % len(cache)]
    want = evaluate.direction_verdict(rule_list, subject, peer, Direction.INGRESS, *packet,
                                      mode, NAMED_PORTS)
    for perm in itertools.permutations(rule_list):
        got = resolve(list(perm), subject, cache, mode=mode, named_ports=NAMED_PORTS)
        assert got.entries == baseline.entries
        assert (got.ingress_enforced, got.egress_enforced) == (
            baseline.ingress_enforced, baseline.egress_enforced)
        again = evaluate.direction_verdict(list(perm), subject, peer, Direction.INGRESS,
                                           *packet, mode, NAMED_PORTS)
        assert again.verdict == want.verdict


def test_reserved_identities_are_in_the_universe():
    assert set(RESERVED_IDENTITIES) <= {i.id for i in universe([]).all()}
