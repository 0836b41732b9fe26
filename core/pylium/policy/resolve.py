"""Resolution: rules + the endpoint's labels + known identities → the endpoint's map state.

Semantics (Cilium's, checked against the reference evaluator in `evaluate.py`):

* A rule applies to an endpoint when its endpointSelector (nodeSelector for the host)
  matches the endpoint's labels. A direction is *enforced* once an applying rule has rules
  in it; it then defaults to deny unless every such rule says `enableDefaultDeny: false`
  (then an allow-all entry is added so deny rules still bite). Modes: `default`, `always`
  (enforce and default-deny even without rules), `never` (enforce nothing).
* Each allow/deny item contributes (peers × port specs). No L3 peer but ports → every
  identity (the wildcard, key identity 0); neither → nothing (`ingress: [{}]` selects the
  endpoint but allows nothing). fromRequires of all applying rules are ANDed onto every
  fromEndpoints selector of the same kind (allow or deny).
* A port spec is (protocol, first port, last port); ANY with a port means TCP, UDP and
  SCTP; ICMP types are ports of ICMP/ICMPv6. Named ports resolve through the endpoint's
  `named_ports`; an unknown name matches nothing.
* Deny beats allow. A packet allowed by any spec that carries L7 rules (for any peer: the
  spec is one L4 filter, as in Cilium) is redirected to that L7 protocol's proxy port.

The map state is built so the datapath's longest-prefix lookup (`mapstate.lookup`) gives
exactly these verdicts: every identity with its own keys also gets a copy of each wildcard
key, and each key's entry is the verdict of all specs that contain it for that identity.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping

import attrs

from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity
from pylium.policy.kafka import KafkaRequest
from pylium.policy.kafka import allows as kafka_allows
from pylium.policy.l4 import PORT_PROTOCOLS, PORTED, L7Rules
from pylium.policy.mapstate import (
    IDENTITY_ANY,
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_ICMPV6,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    port_range_blocks,
)
from pylium.policy.rule import Policy, Rule
from pylium.policy.selector import Requirement
from pylium.policy.selectorcache import (
    WILDCARD,
    CIDRPeer,
    EntityPeer,
    LabelPeer,
    NoPeer,
    Peer,
    SelectorCache,
)

ENFORCEMENT_MODES = ("default", "always", "never")

#: Proxy ports: one stable port per (L7 protocol, direction). The L7 proxy listens on
#: these; the datapath redirects an entry with a proxy port there.
PROXY_PORTS = {
    ("http", Direction.INGRESS): 10080, ("http", Direction.EGRESS): 10081,
    ("kafka", Direction.INGRESS): 10092, ("kafka", Direction.EGRESS): 10093,
    ("dns", Direction.INGRESS): 10052, ("dns", Direction.EGRESS): 10053,
}

#: (protocol number, first port, last port)
Spec = tuple[int, int, int]
ANY_SPEC: Spec = (PROTO_ANY, 0, 0xFFFF)


@attrs.frozen
class NamedRule:
    """A rule with the name it is reported under (policy ref, index)."""

    rule: Rule
    name: str


@attrs.frozen
class L7Grant:
    """One allow that applies to a redirected key: `rules` None = every request."""

    rule: str
    kind: str = ""
    rules: tuple = ()
    allow_all: bool = False


def named_rules(policies: Iterable[Policy]) -> list[NamedRule]:
    return [NamedRule(rule, p.rule_name(i)) for p in policies for i, rule in
            enumerate(p.rules)]


def rule_selects(rule: Rule, labels: LabelSet) -> bool:
    """Cilium: endpointSelector rules never select the host endpoint; nodeSelector (host
    policy) rules select only it."""
    is_host = labels.has("reserved", "host")
    if rule.endpoint_selector is not None:
        return not is_host and rule.endpoint_selector.matches(labels)
    return is_host and rule.node_selector.matches(labels)


# items → contributions ----------------------------------------------------------------

def port_specs(item, named_ports: Mapping[str, int] | None) -> list[tuple[Spec, L7Rules | None]]:
    """The (spec, L7 rules) pairs of one allow/deny item's toPorts and icmps."""
    out: list[tuple[Spec, L7Rules | None]] = []
    for port_rule in item.to_ports:
        l7 = port_rule.l7
        for pp in port_rule.ports:
            if pp.is_named:
                number = (named_ports or {}).get(pp.port)
                if number is None:
                    continue
                first = last = number
            else:
                first = int(pp.port)
                last = pp.end_port or first
            protos = PORTED if (pp.protocol == "ANY" and first) else (pp.protocol,)
            for proto in protos:
                number = PORT_PROTOCOLS[proto]
                if number == PROTO_ANY:
                    out.append((ANY_SPEC, l7))
                elif first == 0:
                    out.append(((number, 0, 0xFFFF), l7))
                else:
                    out.append(((number, first, last), l7))
    for icmp in item.icmps:
        for f in icmp.fields:
            proto = PROTO_ICMPV6 if f.family == "IPv6" else PROTO_ICMP
            out.append(((proto, int(f.type), int(f.type)), None))
    return out


def item_peers(item, requirements: tuple[Requirement, ...]) -> list[Peer]:
    """The peers one allow/deny item names (fromRequires applied to fromEndpoints)."""
    if not item.l3_present:
        return [WILDCARD] if item.l4_present else []
    peers: list[Peer] = []
    for sel in item.endpoints:
        sel = sel.with_requirements(requirements) if requirements else sel
        peers.append(WILDCARD if sel.is_wildcard else LabelPeer(sel))
    peers += [CIDRPeer(str(ipaddress.ip_network(c))) for c in item.cidrs]
    peers += [CIDRPeer(s.cidr, tuple(s.except_)) for s in item.cidr_sets]
    peers += [WILDCARD if e == "all" else EntityPeer(e) for e in item.entities]
    peers += [NoPeer("toServices needs the service layer") for _ in item.services]
    peers += [NoPeer(f"toFQDNs {f} needs DNS") for f in item.fqdns]
    return peers


@attrs.frozen
class Contribution:
    peers: tuple[Peer, ...]
    spec: Spec
    l7: L7Rules | None
    deny: bool
    rule: str


def contributions(rules: list[NamedRule], direction: Direction,
                  named_ports: Mapping[str, int] | None) -> list[Contribution]:
    ingress = direction == Direction.INGRESS
    allow_attr, deny_attr = ("ingress", "ingress_deny") if ingress else ("egress", "egress_deny")
    reqs: dict[bool, tuple[Requirement, ...]] = {False: (), True: ()}
    for nr in rules:
        for deny, attr in ((False, allow_attr), (True, deny_attr)):
            for item in getattr(nr.rule, attr):
                for sel in item.requires:
                    reqs[deny] += sel.as_requirements()
    out: list[Contribution] = []
    for nr in rules:
        for deny, attr in ((False, allow_attr), (True, deny_attr)):
            for item in getattr(nr.rule, attr):
                peers = tuple(item_peers(item, reqs[deny]))
                if not peers:
                    continue
                specs = port_specs(item, named_ports) if item.l4_present else [(ANY_SPEC, None)]
                for spec, l7 in specs:
                    out.append(Contribution(peers, spec, l7, deny, nr.name))
    return out


def enforcement(rules: list[NamedRule], direction: Direction, mode: str) -> tuple[bool, bool]:
    """(enforced, default deny) for one direction."""
    if mode == "never":
        return False, False
    ingress = direction == Direction.INGRESS
    if mode == "always":
        return True, True
    has = any(nr.rule.has_direction(ingress) for nr in rules)
    default_deny = any(nr.rule.default_deny(ingress) for nr in rules)
    return has or default_deny, default_deny


# map state construction --------------------------------------------------------------

def _contains(spec: Spec, key: PolicyKey) -> bool:
    if spec[0] == PROTO_ANY:
        return True
    if key.protocol != spec[0]:
        return False
    first, last = key.port_range
    return spec[1] <= first and last <= spec[2]


def _blocks(spec: Spec) -> list[tuple[int, int, int]]:
    if spec[0] == PROTO_ANY:
        return [(PROTO_ANY, 0, 0)]
    return [(spec[0], port, plen) for port, plen in port_range_blocks(spec[1], spec[2])]


def proxy_port(kind: str, direction: Direction) -> int:
    return PROXY_PORTS[(kind, direction)]


def build_entries(contribs: list[Contribution], direction: Direction,
                  select: Callable[[Peer], frozenset[int]]
                  ) -> tuple[dict[PolicyKey, PolicyEntry], dict[PolicyKey, tuple[L7Grant, ...]]]:
    redirect: dict[Spec, int] = {}
    for c in contribs:
        if not c.deny and c.l7 is not None:
            port = proxy_port(c.l7.kind, direction)
            redirect[c.spec] = min(port, redirect.get(c.spec, port))
    # identity → the contributions that apply to it (0 = wildcard ones)
    per_identity: dict[int, list[Contribution]] = {}
    for c in contribs:
        ids: set[int] = set()
        for peer in c.peers:
            ids |= select(peer)
        for number in ids:
            per_identity.setdefault(number, []).append(c)
    wildcard = per_identity.get(IDENTITY_ANY, [])
    wildcard_blocks = {b for c in wildcard for b in _blocks(c.spec)}
    entries: dict[PolicyKey, PolicyEntry] = {}
    l7: dict[PolicyKey, tuple[L7Grant, ...]] = {}
    for number, own in per_identity.items():
        relevant = own if number == IDENTITY_ANY else own + wildcard
        blocks = {b for c in own for b in _blocks(c.spec)} | wildcard_blocks
        for proto, port, plen in blocks:
            key = PolicyKey(number, direction, proto, port, plen)
            hits = [c for c in relevant if _contains(c.spec, key)]
            denies = [c for c in hits if c.deny]
            if denies:
                entries[key] = PolicyEntry(deny=True, derived_from=tuple(
                    sorted({c.rule for c in denies})))
                continue
            allows = [c for c in hits if not c.deny]
            if not allows:
                continue
            ports = [redirect[c.spec] for c in allows if c.spec in redirect]
            names = tuple(sorted({c.rule for c in allows}))
            entries[key] = PolicyEntry(proxy_port=min(ports) if ports else 0,
                                       derived_from=names)
            if ports:
                l7[key] = tuple(
                    L7Grant(c.rule, c.l7.kind, c.l7.rules) if c.l7 is not None
                    else L7Grant(c.rule, allow_all=True) for c in allows)
    return entries, l7


def compute(rules: list[NamedRule], labels: LabelSet, select: Callable[[Peer], frozenset[int]],
            mode: str = "default", named_ports: Mapping[str, int] | None = None,
            revision: int = 0) -> tuple[EndpointPolicy, set[Peer]]:
    """The map state of one endpoint and the peers it depends on."""
    if mode not in ENFORCEMENT_MODES:
        raise ValueError(f"enforcement mode {mode!r} is not one of {ENFORCEMENT_MODES}")
    selecting = [nr for nr in rules if rule_selects(nr.rule, labels)]
    entries: dict[PolicyKey, PolicyEntry] = {}
    l7: dict[PolicyKey, tuple[L7Grant, ...]] = {}
    enforced: dict[Direction, bool] = {}
    used: set[Peer] = set()
    for direction in Direction:
        on, default_deny = enforcement(selecting, direction, mode)
        enforced[direction] = on
        if not on:
            continue
        contribs = contributions(selecting, direction, named_ports)
        if not default_deny:
            contribs.append(Contribution((WILDCARD,), ANY_SPEC, None, False,
                                         "(enableDefaultDeny: false)"))
        for c in contribs:
            used.update(c.peers)
        got, got_l7 = build_entries(contribs, direction, select)
        entries.update(got)
        l7.update(got_l7)
    policy = EndpointPolicy(ingress_enforced=enforced[Direction.INGRESS],
                            egress_enforced=enforced[Direction.EGRESS],
                            entries=entries, revision=revision, l7=l7)
    return policy, used


def cidr_prefixes(rules: Iterable[NamedRule]) -> set[str]:
    """Every CIDR (and except) prefix the rules name: each needs a CIDR identity."""
    out: set[str] = set()
    for nr in rules:
        r = nr.rule
        for item in r.ingress + r.ingress_deny + r.egress + r.egress_deny:
            out.update(str(ipaddress.ip_network(c)) for c in item.cidrs)
            for s in item.cidr_sets:
                out.add(s.cidr)
                out.update(s.except_)
    return out


def resolve(policies: Iterable[Policy] | Iterable[Rule], labels: LabelSet | Identity,
            identities: IdentityCache | Iterable[Identity] = (), mode: str = "default",
            named_ports: Mapping[str, int] | None = None) -> EndpointPolicy:
    """One-shot resolution (no caching): the map state of the endpoint with `labels`.

    `identities` are the identities known besides the reserved ones; CIDR identities for
    the rules' prefixes are added to it."""
    policies = list(policies)
    rules = [NamedRule(p, f"rule[{i}]") for i, p in enumerate(policies) if isinstance(p, Rule)]
    rules += named_rules(p for p in policies if isinstance(p, Policy))
    cache = identities if isinstance(identities, IdentityCache) else IdentityCache(identities)
    for prefix in sorted(cidr_prefixes(rules)):
        cache.cidr_identity(prefix)
    if isinstance(labels, Identity):
        labels = labels.labels
    selector_cache = SelectorCache(cache)
    policy, _ = compute(rules, LabelSet(labels), selector_cache.selections, mode, named_ports)
    return policy


def l7_allows(policy: EndpointPolicy, key: PolicyKey | None, request) -> bool:
    """What the L7 proxy decides for an HTTP or Kafka `request` redirected by the entry
    `key` (from `mapstate.lookup(...).key`): allowed if any grant on it allows every
    request or has rules of the request's protocol that allow it."""
    if key is None:
        return False
    for grant in policy.l7.get(key, ()):
        if grant.allow_all:
            return True
        if grant.kind == "http" and hasattr(request, "method") and any(
                r.matches(request.method, request.path, request.host, dict(request.headers))
                for r in grant.rules):
            return True
    if isinstance(request, KafkaRequest):  # topics may be allowed by different grants
        return kafka_allows([r for g in policy.l7.get(key, ()) if g.kind == "kafka"
                             for r in g.rules], request)
    return False
