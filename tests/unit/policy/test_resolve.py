"""Resolution semantics on small, named scenarios (each checked both through the map state
lookup and against the reference evaluator)."""

from __future__ import annotations

import pytest
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import IDENTITY_HOST, IDENTITY_WORLD, Identity
from pylium.policy import evaluate
from pylium.policy.load import load_text
from pylium.policy.mapstate import Direction, Verdict, lookup
from pylium.policy.resolve import PROXY_PORTS, l7_allows, resolve

IN, OUT = Direction.INGRESS, Direction.EGRESS
ALLOW, DENY, REDIRECT = Verdict.ALLOW, Verdict.DENY, Verdict.REDIRECT


def labels(text: str, ns: str = "default") -> LabelSet:
    return LabelSet.parse(f"{text},k8s:io.kubernetes.pod.namespace={ns}")


WEB = Identity(256, labels("app=web"))
API = Identity(257, labels("app=api"))
DB = Identity(258, labels("app=db"))
OTHER_NS = Identity(259, labels("app=web", "other"))


def cnp(spec: str, ns: str = "default", kind: str = "CiliumNetworkPolicy"):
    meta = f"{{name: p, namespace: {ns}}}" if kind == "CiliumNetworkPolicy" else "{name: p}"
    return load_text(f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\n"
                     f"spec:\n{spec}")


class Scenario:
    def __init__(self, policies, subject: Identity, mode: str = "default",
                 named_ports=None, extra=()):
        self.policies = policies
        self.subject = subject
        self.mode = mode
        self.named_ports = named_ports
        self.cache = IdentityCache([WEB, API, DB, OTHER_NS, *extra])
        self.policy = resolve(policies, subject, self.cache, mode, named_ports)

    def check(self, peer: Identity, direction: Direction, proto: int, port: int) -> Verdict:
        got = lookup(self.policy, peer.id, direction, proto, port)
        want = evaluate.direction_verdict(self.policies, self.subject.labels, peer, direction,
                                          proto, port, self.mode, self.named_ports)
        assert got.verdict == want.verdict, (got, want)
        return got.verdict


def test_open_until_a_rule_selects_then_default_deny():
    s = Scenario(cnp("  endpointSelector: {matchLabels: {app: db}}\n"
                     "  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]"), DB)
    assert s.check(API, IN, 6, 5432) == ALLOW
    assert s.check(WEB, IN, 6, 5432) == DENY
    assert s.check(WEB, OUT, 6, 80) == ALLOW  # egress not enforced
    assert not s.policy.egress_enforced
    assert Scenario(cnp("  endpointSelector: {matchLabels: {app: db}}\n"
                        "  ingress: [{}]"), DB).check(API, IN, 6, 1) == DENY


def test_enforcement_modes():
    policies = cnp("  endpointSelector: {matchLabels: {app: db}}\n"
                   "  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]")
    assert Scenario(policies, DB, "never").check(WEB, IN, 6, 1) == ALLOW
    always = Scenario(policies, WEB, "always")  # no rule selects web: still default deny
    assert always.check(API, IN, 6, 1) == DENY and always.check(API, OUT, 6, 1) == DENY


def test_deny_beats_allow_and_is_stored_as_deny():
    s = Scenario(cnp("""  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: api}}], toPorts: [{ports: [{port: "5432"}]}]}]
  ingressDeny: [{fromEndpoints: [{matchLabels: {app: api}}]}]"""), DB)
    assert s.check(API, IN, 6, 5432) == DENY
    assert all(e.deny for k, e in s.policy.entries.items() if k.identity == API.id)


def test_from_endpoints_wildcard_is_namespace_scoped_in_a_cnp():
    s = Scenario(cnp("  endpointSelector: {}\n  ingress: [{fromEndpoints: [{}]}]"), WEB)
    assert s.check(API, IN, 6, 80) == ALLOW
    assert s.check(OTHER_NS, IN, 6, 80) == DENY
    assert s.check(Identity(IDENTITY_WORLD, LabelSet.parse("reserved:world")), IN, 6, 80) == DENY


def test_bare_rule_list_wildcard_selects_every_identity():
    (policy,) = load_text('[{"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}]')
    s = Scenario([policy], WEB)
    assert s.check(OTHER_NS, IN, 6, 80) == ALLOW
    world = s.cache.get(IDENTITY_WORLD)
    assert s.check(world, IN, 17, 53) == ALLOW


def test_entities():
    s = Scenario(cnp("  endpointSelector: {}\n  ingress: [{fromEntities: [cluster]}]\n"
                     "  egress: [{toEntities: [world]}]"), WEB)
    host, world = s.cache.get(IDENTITY_HOST), s.cache.get(IDENTITY_WORLD)
    assert s.check(host, IN, 6, 22) == ALLOW and s.check(OTHER_NS, IN, 6, 22) == ALLOW
    assert s.check(world, IN, 6, 22) == DENY
    assert s.check(world, OUT, 6, 443) == ALLOW and s.check(API, OUT, 6, 443) == DENY


def test_cidr_except_uses_cidr_identities():
    s = Scenario(cnp("  endpointSelector: {}\n  egress:\n"
                     "  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]"), WEB)
    inside = s.cache.for_ip("10.1.2.3")
    excepted = s.cache.for_ip("10.96.0.10")
    outside = s.cache.for_ip("8.8.8.8")
    assert inside.cidr is not None and inside.id >= 1 << 24
    assert s.check(inside, OUT, 6, 80) == ALLOW
    assert s.check(excepted, OUT, 6, 80) == DENY
    assert outside.id == IDENTITY_WORLD and s.check(outside, OUT, 6, 80) == DENY


def test_from_requires_is_anded_onto_every_from_endpoints():
    prod_api = Identity(260, labels("app=api,env=prod"))
    policies = cnp("""  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromRequires: [{matchLabels: {env: prod}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: q}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]""")
    s = Scenario(policies, DB, extra=[prod_api])
    assert s.check(prod_api, IN, 6, 5432) == ALLOW
    assert s.check(API, IN, 6, 5432) == DENY


def test_any_protocol_with_a_port_expands_to_tcp_udp_sctp():
    s = Scenario(cnp("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '53'}]}]}]"),
                 WEB)
    assert {k.protocol for k in s.policy.entries} == {6, 17, 132}
    assert s.check(API, IN, 17, 53) == ALLOW and s.check(API, IN, 1, 53) == DENY


def test_port_ranges_named_ports_and_icmp():
    s = Scenario(cnp("""  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "8000", endPort: 8080, protocol: TCP}, {port: web, protocol: TCP}]}]
  - icmps: [{fields: [{type: 8}]}]"""), WEB, named_ports={"web": 9443})
    assert s.check(API, IN, 6, 8000) == ALLOW and s.check(API, IN, 6, 8080) == ALLOW
    assert s.check(API, IN, 6, 8081) == DENY and s.check(API, IN, 6, 9443) == ALLOW
    assert s.check(API, IN, 1, 8) == ALLOW and s.check(API, IN, 1, 0) == DENY
    unresolved = Scenario(s.policies, WEB)  # named port unknown: matches nothing
    assert unresolved.check(API, IN, 6, 9443) == DENY


def test_enable_default_deny_false_keeps_traffic_flowing_but_denies_still_bite():
    s = Scenario(cnp("""  endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingressDeny: [{fromEndpoints: [{matchLabels: {app: api}}]}]"""), WEB)
    assert s.check(DB, IN, 6, 80) == ALLOW and s.check(API, IN, 6, 80) == DENY


def test_l7_redirects_the_whole_port_and_keeps_rules_for_the_proxy():
    s = Scenario(cnp("""  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: /ok}]}}]
  - fromEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]"""), WEB)
    decision = lookup(s.policy, API.id, IN, 6, 80)
    assert decision.verdict == REDIRECT
    assert decision.proxy_port == PROXY_PORTS[("http", IN)]
    assert l7_allows(s.policy, decision.key, evaluate.HTTPRequest("GET", "/ok"))
    assert not l7_allows(s.policy, decision.key, evaluate.HTTPRequest("GET", "/no"))
    # db has no L7 rule on the same port: still proxied (same L4 filter), but allowed all
    db = lookup(s.policy, DB.id, IN, 6, 80)
    assert db.verdict == REDIRECT and l7_allows(s.policy, db.key, evaluate.HTTPRequest("PUT", "/"))


def test_l3_allow_of_a_peer_also_allows_its_requests_on_a_wildcard_l7_port():
    s = Scenario(cnp("""  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
  - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]"""), WEB)
    decision = lookup(s.policy, API.id, IN, 6, 80)
    assert decision.verdict == REDIRECT
    assert l7_allows(s.policy, decision.key, evaluate.HTTPRequest("DELETE", "/x"))
    other = lookup(s.policy, DB.id, IN, 6, 80)
    assert not l7_allows(s.policy, other.key, evaluate.HTTPRequest("DELETE", "/x"))


def test_clusterwide_policy_selects_across_namespaces():
    s = Scenario(cnp("  endpointSelector: {matchLabels: {app: web}}\n"
                     "  ingress: [{fromEndpoints: [{}]}]", kind="CiliumClusterwideNetworkPolicy"),
                 OTHER_NS)
    assert s.policy.ingress_enforced
    assert s.check(API, IN, 6, 1) == ALLOW
    assert s.check(s.cache.get(IDENTITY_WORLD), IN, 6, 1) == DENY


@pytest.mark.parametrize("peer, expected", [(API, ALLOW), (WEB, DENY)])
def test_network_policy_is_enforced_like_cilium(peer, expected):
    policies = load_text("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 5432}]}]
""")
    s = Scenario(policies, DB)
    assert s.check(peer, IN, 6, 5432) == expected
    assert s.check(API, IN, 17, 5432) == DENY


def test_host_is_selected_only_by_node_selectors():
    host = Identity(IDENTITY_HOST, LabelSet.parse("reserved:host"))
    everyone = cnp("  endpointSelector: {}\n  ingress: [{}]", kind="CiliumClusterwideNetworkPolicy")
    assert not Scenario(everyone, host).policy.ingress_enforced
    nodes = cnp("  nodeSelector: {}\n  ingress: [{fromEntities: [cluster]}]",
                kind="CiliumClusterwideNetworkPolicy")
    s = Scenario(nodes, host)
    assert s.policy.ingress_enforced
    assert s.check(API, IN, 6, 22) == ALLOW
    assert s.check(s.cache.get(IDENTITY_WORLD), IN, 6, 22) == DENY
    assert not Scenario(nodes, WEB).policy.ingress_enforced
