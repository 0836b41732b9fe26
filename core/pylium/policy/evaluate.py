"""The reference evaluator: the oracle the map state (and later the BPF datapath) is
checked against. It walks the rules for one packet, plainly, with no map state, no
selector cache and no port blocks, and says what Cilium would do and which rules decided.

See `resolve.py` for the semantics both implement."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import attrs

from pylium.identity.labels import LabelSet
from pylium.identity.model import RESERVED_BY_NAME, Identity
from pylium.policy import kafka
from pylium.policy.mapstate import Direction, Verdict
from pylium.policy.rule import Policy, Rule
from pylium.policy.selector import EndpointSelector

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58, "VRRP": 112,
             "IGMP": 2}
L7_PROXY_PORTS = {("http", Direction.INGRESS): 10080, ("http", Direction.EGRESS): 10081,
                  ("kafka", Direction.INGRESS): 10092, ("kafka", Direction.EGRESS): 10093,
                  ("dns", Direction.INGRESS): 10052, ("dns", Direction.EGRESS): 10053}


@attrs.frozen
class HTTPRequest:
    method: str = "GET"
    path: str = "/"
    host: str = ""
    headers: Mapping[str, str] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class Party:
    """One side of a connection: its identity, and whether it is a local endpoint (whose
    own policy applies) or something outside (world/CIDR, a remote node)."""

    identity: Identity
    endpoint: bool = True
    named_ports: Mapping[str, int] = attrs.field(factory=dict, eq=False)

    @property
    def labels(self) -> LabelSet:
        return self.identity.labels


@attrs.frozen
class DirectionResult:
    direction: Direction
    verdict: Verdict
    rules: tuple[str, ...] = ()
    reason: str = ""
    proxy_port: int = 0
    enforced: bool = True


@attrs.frozen
class Result:
    verdict: Verdict
    rules: tuple[str, ...]
    reason: str
    egress: DirectionResult | None = None
    ingress: DirectionResult | None = None

    def to_dict(self) -> dict:
        def side(d: DirectionResult | None):
            if d is None:
                return None
            return {"verdict": d.verdict.value, "rules": list(d.rules), "reason": d.reason,
                    "enforced": d.enforced, "proxy_port": d.proxy_port}
        return {"verdict": self.verdict.value, "rules": list(self.rules),
                "reason": self.reason, "egress": side(self.egress),
                "ingress": side(self.ingress)}


def _named(policies: Iterable[Policy | Rule]) -> list[tuple[Rule, str]]:
    out: list[tuple[Rule, str]] = []
    for index, p in enumerate(policies):
        if isinstance(p, Rule):
            out.append((p, f"rule[{index}]"))
        else:
            out += [(r, p.rule_name(i)) for i, r in enumerate(p.rules)]
    return out


# peers -----------------------------------------------------------------------------

def _is_outside(identity: Identity) -> bool:
    return identity.id == RESERVED_BY_NAME["world"] or identity.cidr is not None


def _entity(entity: str, peer: Identity) -> bool:
    if entity == "all":
        return True
    if entity in ("world", "world-ipv4", "world-ipv6"):
        if not _is_outside(peer):
            return False
        if entity == "world" or peer.cidr is None:
            return True
        return peer.cidr.version == (4 if entity.endswith("ipv4") else 6)
    if entity == "cluster":
        return not _is_outside(peer)
    if entity == "none":
        return False
    return RESERVED_BY_NAME.get(entity) == peer.id


def _cidr(cidr: str, excepts: Iterable[str], peer: Identity) -> bool:
    net = ipaddress.ip_network(cidr)
    if peer.cidr is None:
        return net.prefixlen == 0 and peer.id == RESERVED_BY_NAME["world"]
    if peer.cidr.version != net.version or not peer.cidr.subnet_of(net):
        return False
    return not any(peer.cidr.version == ipaddress.ip_network(e).version
                   and peer.cidr.subnet_of(ipaddress.ip_network(e)) for e in excepts)


def _peer_matches(item, peer: Identity, requirements) -> bool:
    if not item.l3_present:
        return bool(item.to_ports or item.icmps)
    for sel in item.endpoints:
        full = EndpointSelector(sel.match_labels, sel.match_expressions + requirements)
        if full.matches(peer.labels):
            return True
    if any(_cidr(c, (), peer) for c in item.cidrs):
        return True
    if any(_cidr(s.cidr, s.except_, peer) for s in item.cidr_sets):
        return True
    return any(_entity(e, peer) for e in item.entities)


# ports ------------------------------------------------------------------------------

def _specs(pp, named_ports: Mapping[str, int]) -> list[tuple[int, int, int]]:
    """(protocol or 0 for any, first, last) of one ports entry."""
    if pp.port.isdigit():
        first = int(pp.port)
        last = pp.end_port or first
    elif pp.port in named_ports:
        first = last = named_ports[pp.port]
    else:
        return []
    if pp.protocol == "ANY":
        if first == 0:
            return [(0, 0, 65535)]
        return [(p, first, last) for p in (6, 17, 132)]
    if first == 0:
        return [(PROTOCOLS[pp.protocol], 0, 65535)]
    return [(PROTOCOLS[pp.protocol], first, last)]


def _spec_hit(spec, proto: int, port: int) -> bool:
    return spec[0] == 0 or (spec[0] == proto and spec[1] <= port <= spec[2])


def _port_hits(item, proto: int, port: int, named_ports) -> list[tuple[tuple, object]]:
    """[(spec, port rule)] of the item that contain the packet; no L4 = everything."""
    if not item.to_ports and not item.icmps:
        return [((0, 0, 65535), None)]
    hits = []
    for port_rule in item.to_ports:
        for pp in port_rule.ports:
            for spec in _specs(pp, named_ports):
                if _spec_hit(spec, proto, port):
                    hits.append((spec, port_rule))
    for icmp in item.icmps:
        for f in icmp.fields:
            p = 58 if f.family == "IPv6" else 1
            if proto == p and port == int(f.type):
                hits.append(((p, port, port), None))
    return hits


def _l7_allows(grants: list[tuple[str, object]],
               request: HTTPRequest | kafka.KafkaRequest | None) -> list[str]:
    """Names of the rules that let this request through the proxy."""
    ok = []
    for name, port_rule in grants:
        l7 = port_rule.l7 if port_rule is not None else None
        if l7 is None:
            ok.append(name)
        elif isinstance(request, HTTPRequest) and l7.http and any(
                r.matches(request.method, request.path, request.host, dict(request.headers))
                for r in l7.http):
            ok.append(name)
        elif isinstance(request, kafka.KafkaRequest) and l7.kafka and kafka.allows(
                l7.kafka, request):
            ok.append(name)
    if not ok and isinstance(request, kafka.KafkaRequest):  # topics allowed by different rules
        kafka_rules = [r for _, pr in grants if pr is not None and pr.l7 is not None
                       for r in pr.l7.kafka]
        if kafka.allows(kafka_rules, request):
            ok = [name for name, pr in grants if pr is not None and pr.l7 is not None
                  and pr.l7.kafka]
    return ok


# one direction --------------------------------------------------------------------------

def direction_verdict(policies: Iterable[Policy | Rule], subject: LabelSet, peer: Identity,
                      direction: Direction, proto: int, port: int, mode: str = "default",
                      named_ports: Mapping[str, int] | None = None,
                      request: HTTPRequest | kafka.KafkaRequest | None = None
                      ) -> DirectionResult:
    """The verdict of the policy of the endpoint with labels `subject` for a packet to
    (ingress) or from (egress) `peer`. With `request`, a redirected packet is also judged
    as the L7 proxy would."""
    named_ports = named_ports or {}
    ingress = direction == Direction.INGRESS
    allow_attr, deny_attr = ("ingress", "ingress_deny") if ingress else ("egress", "egress_deny")
    selecting = []
    for rule, name in _named(policies):
        host = any(lb.source == "reserved" and lb.key == "host" for lb in subject)
        if rule.endpoint_selector is not None:
            applies = not host and rule.endpoint_selector.matches(subject)
        else:
            applies = host and rule.node_selector.matches(subject)
        if applies:
            selecting.append((rule, name))
    if mode == "never":
        return DirectionResult(direction, Verdict.ALLOW, (), "policy enforcement is never",
                               enforced=False)
    has_rules = any(getattr(r, allow_attr) or getattr(r, deny_attr) for r, _ in selecting)
    default_deny = mode == "always" or any(r.default_deny(ingress) for r, _ in selecting)
    if not has_rules and not default_deny:
        return DirectionResult(direction, Verdict.ALLOW, (),
                               "no rule selects the endpoint in this direction",
                               enforced=False)
    requires = {"allow": (), "deny": ()}
    for rule, _ in selecting:
        for kind, attr in (("allow", allow_attr), ("deny", deny_attr)):
            for item in getattr(rule, attr):
                for sel in item.requires:
                    requires[kind] += sel.as_requirements()
    # deny beats everything
    deniers = []
    for rule, name in selecting:
        for item in getattr(rule, deny_attr):
            if _peer_matches(item, peer, requires["deny"]) and \
                    _port_hits(item, proto, port, named_ports):
                deniers.append(name)
    if deniers:
        return DirectionResult(direction, Verdict.DENY, tuple(sorted(set(deniers))),
                               "a deny rule matches")
    # which L4 filters carry L7 rules (for any peer): those redirect to the proxy
    redirect_specs: dict[tuple, int] = {}
    for rule, _ in selecting:
        for item in getattr(rule, allow_attr):
            for port_rule in item.to_ports:
                if port_rule.l7 is None:
                    continue
                proxy = L7_PROXY_PORTS[(port_rule.l7.kind, direction)]
                for pp in port_rule.ports:
                    for spec in _specs(pp, named_ports):
                        redirect_specs[spec] = min(proxy, redirect_specs.get(spec, proxy))
    grants: list[tuple[str, object]] = []
    proxies: list[int] = []
    for rule, name in selecting:
        for item in getattr(rule, allow_attr):
            if not _peer_matches(item, peer, requires["allow"]):
                continue
            for spec, port_rule in _port_hits(item, proto, port, named_ports):
                grants.append((name, port_rule))
                if spec in redirect_specs:
                    proxies.append(redirect_specs[spec])
    if not default_deny:
        grants.append(("(enableDefaultDeny: false)", None))
    if not grants:
        return DirectionResult(direction, Verdict.DENY, (),
                               "no rule allows it (default deny)")
    names = tuple(sorted({name for name, _ in grants}))
    if not proxies:
        return DirectionResult(direction, Verdict.ALLOW, names, "allowed by rule")
    proxy = min(proxies)
    if request is None:
        return DirectionResult(direction, Verdict.REDIRECT, names,
                               "allowed at L4, redirected to the L7 proxy", proxy)
    allowed_by = _l7_allows(grants, request)
    what = describe_request(request)
    if allowed_by:
        return DirectionResult(direction, Verdict.REDIRECT, tuple(sorted(set(allowed_by))),
                               f"L7 proxy allows {what}", proxy)
    return DirectionResult(direction, Verdict.DENY, names,
                           f"L7 proxy denies {what}: no L7 rule matches", proxy)


def describe_request(request: HTTPRequest | kafka.KafkaRequest) -> str:
    if isinstance(request, kafka.KafkaRequest):
        name = kafka.API_KEY_NAMES.get(request.api_key, str(request.api_key))
        topics = ",".join(request.topics or ())
        return f"Kafka {name} v{request.api_version}" + (f" topic {topics}" if topics else "")
    return f"{request.method} {request.path}"


def verdict(policies: Iterable[Policy | Rule], src: Party, dst: Party, port: int,
            proto: int | str, l7: HTTPRequest | kafka.KafkaRequest | None = None,
            mode: str = "default") -> Result:
    """The verdict for a packet from `src` to `dst`: the source endpoint's egress policy
    and the destination endpoint's ingress policy must both let it through."""
    policies = list(policies)
    if isinstance(proto, str):
        proto = PROTOCOLS[proto.upper()]
    egress = ingress = None
    if src.endpoint:
        egress = direction_verdict(policies, src.labels, dst.identity, Direction.EGRESS,
                                   proto, port, mode, dst.named_ports, l7)
    if dst.endpoint:
        ingress = direction_verdict(policies, dst.labels, src.identity, Direction.INGRESS,
                                    proto, port, mode, dst.named_ports, l7)
    sides = [s for s in (egress, ingress) if s is not None]
    for side in sides:
        if side.verdict == Verdict.DENY:
            return Result(Verdict.DENY, side.rules,
                          f"{side.direction.name.lower()}: {side.reason}", egress, ingress)
    rules = tuple(r for s in sides for r in s.rules)
    redirected = [s for s in sides if s.verdict == Verdict.REDIRECT]
    if redirected:
        return Result(Verdict.REDIRECT, rules, "; ".join(
            f"{s.direction.name.lower()}: {s.reason}" for s in redirected), egress, ingress)
    reason = "; ".join(f"{s.direction.name.lower()}: {s.reason}" for s in sides) or \
        "neither side is a local endpoint"
    return Result(Verdict.ALLOW, rules, reason, egress, ingress)
