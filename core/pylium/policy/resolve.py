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

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

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
from pylium.policy.selector import EndpointSelector, Requirement
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
    return subject_selects(rule.endpoint_selector, rule.node_selector, labels)


def subject_selects(endpoint_selector: EndpointSelector | None,
                    node_selector: EndpointSelector | None, labels: LabelSet) -> bool:
    """`rule_selects` for a rule's subject alone (rules sharing a subject share the answer)."""
    is_host = labels.has("reserved", "host")
    if endpoint_selector is not None:
        return not is_host and endpoint_selector.matches(labels)
    return is_host and node_selector.matches(labels)


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
    peers += [CIDRPeer(canonical_cidr(c)) for c in item.cidrs]
    peers += [CIDRPeer(s.cidr, tuple(s.except_)) for s in item.cidr_sets]
    peers += [WILDCARD if e == "all" else EntityPeer(e) for e in item.entities]
    peers += [NoPeer("toServices needs the service layer") for _ in item.services]
    peers += [NoPeer(f"toFQDNs {f} needs DNS") for f in item.fqdns]
    return peers


@functools.lru_cache(maxsize=16384)
def canonical_cidr(text: str) -> str:
    """A prefix as `ipaddress` writes it (`10.0.0.0/8`), parsed once per distinct text."""
    return str(ipaddress.ip_network(text))


class Contribution(NamedTuple):
    """(peers × one port spec) of one allow or deny item: a plain tuple, as thousands are
    made per resolution."""

    peers: tuple[Peer, ...]
    spec: Spec
    l7: L7Rules | None
    deny: bool
    rule: str


#: kept contributions of one rule: id(rule) → (the rule, {memo key: contributions})
ContributionMemo = dict[int, tuple[NamedRule, dict[tuple, list[Contribution]]]]


def rule_contributions(nr: NamedRule, direction: Direction,
                       named_ports: Mapping[str, int] | None,
                       reqs: dict[bool, tuple[Requirement, ...]]) -> list[Contribution]:
    """What one rule contributes in one direction, given the fromRequires of all rules."""
    ingress = direction == Direction.INGRESS
    allow_attr, deny_attr = ("ingress", "ingress_deny") if ingress else ("egress", "egress_deny")
    out: list[Contribution] = []
    for deny, attr in ((False, allow_attr), (True, deny_attr)):
        for item in getattr(nr.rule, attr):
            peers = tuple(item_peers(item, reqs[deny]))
            if not peers:
                continue
            specs = port_specs(item, named_ports) if item.l4_present else [(ANY_SPEC, None)]
            for spec, l7 in specs:
                out.append(Contribution(peers, spec, l7, deny, nr.name))
    return out


def contributions(rules: list[NamedRule], direction: Direction,
                  named_ports: Mapping[str, int] | None,
                  memo: ContributionMemo | None = None) -> list[Contribution]:
    """Every rule's contributions. With `memo` (the engine's), a rule's are computed once
    per (direction, named ports, fromRequires) and reused while the rule object lives."""
    ingress = direction == Direction.INGRESS
    allow_attr, deny_attr = ("ingress", "ingress_deny") if ingress else ("egress", "egress_deny")
    reqs: dict[bool, tuple[Requirement, ...]] = {False: (), True: ()}
    for nr in rules:
        for deny, attr in ((False, allow_attr), (True, deny_attr)):
            for item in getattr(nr.rule, attr):
                for sel in item.requires:
                    reqs[deny] += sel.as_requirements()
    out: list[Contribution] = []
    if memo is None:
        for nr in rules:
            out += rule_contributions(nr, direction, named_ports, reqs)
        return out
    key = (direction, tuple(sorted(named_ports.items())) if named_ports else (),
           reqs[False], reqs[True])
    for nr in rules:
        kept = memo.get(id(nr))
        if kept is None or kept[0] is not nr:
            kept = memo[id(nr)] = (nr, {})
        got = kept[1].get(key)
        if got is None:
            got = kept[1][key] = rule_contributions(nr, direction, named_ports, reqs)
        out += got
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

def _contains(spec: Spec, block: tuple[int, int, int]) -> bool:
    """Does the port spec contain every packet of the key block (protocol, port, prefix)?"""
    if spec[0] == PROTO_ANY:
        return True
    proto, port, plen = block
    if proto != spec[0]:
        return False
    return spec[1] <= port and port + (1 << (16 - plen)) - 1 <= spec[2]


@functools.lru_cache(maxsize=16384)
def _blocks(spec: Spec) -> tuple[tuple[int, int, int], ...]:
    if spec[0] == PROTO_ANY:
        return ((PROTO_ANY, 0, 0),)
    return tuple((spec[0], port, plen) for port, plen in port_range_blocks(spec[1], spec[2]))


def proxy_port(kind: str, direction: Direction) -> int:
    return PROXY_PORTS[(kind, direction)]


KeyDecision = tuple[PolicyEntry, tuple[L7Grant, ...] | None]


def _decide(relevant: list[Contribution], blocks: set[tuple[int, int, int]],
            redirect: dict[Spec, int]) -> list[tuple[tuple[int, int, int], KeyDecision]]:
    """The entry of each key block given the contributions that apply to one identity."""
    out: list[tuple[tuple[int, int, int], KeyDecision]] = []
    for block in sorted(blocks):
        hits = [c for c in relevant if _contains(c.spec, block)]
        denies = [c for c in hits if c.deny]
        if denies:
            out.append((block, (PolicyEntry(deny=True, derived_from=tuple(
                sorted({c.rule for c in denies}))), None)))
            continue
        if not hits:
            continue
        ports = [redirect[c.spec] for c in hits if c.spec in redirect]
        names = tuple(sorted({c.rule for c in hits}))
        entry = PolicyEntry(proxy_port=min(ports) if ports else 0, derived_from=names)
        grants = tuple(
            L7Grant(c.rule, c.l7.kind, c.l7.rules) if c.l7 is not None
            else L7Grant(c.rule, allow_all=True) for c in hits) if ports else None
        out.append((block, (entry, grants)))
    return out


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
        peers = c.peers
        if len(peers) == 1:
            ids: frozenset[int] | set[int] = select(peers[0])
        else:
            ids = set()
            for peer in peers:
                ids |= select(peer)
        for number in ids:
            per_identity.setdefault(number, []).append(c)
    wildcard = per_identity.get(IDENTITY_ANY, [])
    wildcard_blocks = {b for c in wildcard for b in _blocks(c.spec)}
    # identities hit by the same contributions get the same entries: decide them once
    groups: dict[tuple, tuple[list[Contribution], list[int]]] = {}
    for number, own in per_identity.items():
        signature = (number == IDENTITY_ANY, *map(id, own))
        group = groups.get(signature)
        if group is None:
            groups[signature] = (own, [number])
        else:
            group[1].append(number)
    entries: dict[PolicyKey, PolicyEntry] = {}
    l7: dict[PolicyKey, tuple[L7Grant, ...]] = {}
    for (is_any, *_), (own, numbers) in groups.items():
        relevant = own if is_any else own + wildcard
        blocks = {b for c in own for b in _blocks(c.spec)} | wildcard_blocks
        decided = _decide(relevant, blocks, redirect)
        for number in numbers:
            for (proto, port, plen), (entry, grants) in decided:
                key = PolicyKey(number, direction, proto, port, plen)
                entries[key] = entry
                if grants is not None:
                    l7[key] = grants
    return entries, l7


def compute(rules: list[NamedRule], labels: LabelSet, select: Callable[[Peer], frozenset[int]],
            mode: str = "default", named_ports: Mapping[str, int] | None = None,
            revision: int = 0, preselected: bool = False,
            memo: ContributionMemo | None = None) -> tuple[EndpointPolicy, set[Peer]]:
    """The map state of one endpoint and the peers it depends on. `preselected`: every
    rule in `rules` is already known to select the endpoint (the engine's index did it);
    `memo`: kept per-rule contributions (see `contributions`)."""
    if mode not in ENFORCEMENT_MODES:
        raise ValueError(f"enforcement mode {mode!r} is not one of {ENFORCEMENT_MODES}")
    selecting = rules if preselected else [nr for nr in rules if rule_selects(nr.rule, labels)]
    entries: dict[PolicyKey, PolicyEntry] = {}
    l7: dict[PolicyKey, tuple[L7Grant, ...]] = {}
    enforced: dict[Direction, bool] = {}
    used: set[Peer] = set()
    for direction in Direction:
        on, default_deny = enforcement(selecting, direction, mode)
        enforced[direction] = on
        if not on:
            continue
        contribs = contributions(selecting, direction, named_ports, memo)
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
