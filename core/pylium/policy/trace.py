"""`pylium policy trace`: what would happen to one packet (and HTTP request), and why.

The verdict comes from the reference evaluator; the map states the resolver computes for
the two endpoints are looked up the datapath's way too, and both answers are reported, so
a disagreement shows. A datapath tracer (the BPF half: load these map states into a real
program and `BPF_PROG_TEST_RUN` the packet) plugs in with `register_datapath_tracer`; the
CLI's `--datapath` option calls it through `trace(..., datapath=True)`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from pylium.errors import UserError
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import POD_NAMESPACE_LABEL, SOURCE_K8S, Label, LabelSet
from pylium.identity.model import LOCAL_SCOPE, MIN_ALLOCATED, Identity
from pylium.policy import evaluate, kafka
from pylium.policy.mapstate import Direction, EndpointPolicy, Verdict, lookup
from pylium.policy.resolve import cidr_prefixes, l7_allows, named_rules, resolve
from pylium.policy.rule import Policy

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58}


@attrs.frozen
class TraceQuery:
    src: str = ""
    dst: str = ""
    src_cidr: str = ""
    dst_cidr: str = ""
    dport: int = 0
    proto: str = "TCP"
    namespace: str = "default"
    http_method: str = ""
    http_path: str = ""
    #: a Kafka request: api key by name (produce) or number; topics comma-separated
    kafka_api_key: str = ""
    kafka_api_version: int = 0
    kafka_client_id: str = ""
    kafka_topic: str = ""

    def __attrs_post_init__(self) -> None:
        for side in ("src", "dst"):
            labels, cidr = getattr(self, side), getattr(self, f"{side}_cidr")
            if bool(labels) == bool(cidr):
                raise UserError(f"give exactly one of --{side} and --{side}-cidr")
            if cidr:
                try:
                    ipaddress.ip_address(cidr)
                except ValueError:
                    raise UserError(f"--{side}-cidr: {cidr!r} is not an IP address") from None
        if self.proto.upper() not in PROTOCOLS:
            raise UserError(f"--proto: {self.proto!r} is not one of {', '.join(PROTOCOLS)}")
        if not 0 <= self.dport <= 65535:
            raise UserError(f"--dport: {self.dport} is not a port")
        if bool(self.http_method) != bool(self.http_path):
            raise UserError("give both --http-method and --http-path, or neither")
        kafka_given = self.kafka_api_key or self.kafka_topic or self.kafka_client_id
        if kafka_given and self.http_method:
            raise UserError("a request is HTTP (--http-*) or Kafka (--kafka-*), not both")
        if kafka_given and not self.kafka_api_key:
            raise UserError("--kafka-api-key is required with --kafka-topic/--kafka-client-id")
        if self.kafka_api_key and not self.kafka_api_key.isdigit() and \
                self.kafka_api_key.lower() not in kafka.API_KEY_NUMBERS:
            raise UserError(f"--kafka-api-key: {self.kafka_api_key!r} is not a Kafka API key")
        if not 0 <= self.kafka_api_version <= 0x7FFF:
            raise UserError(f"--kafka-api-version: {self.kafka_api_version} is not a version")

    @classmethod
    def from_dict(cls, data: dict) -> TraceQuery:
        fields = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise UserError(f"unknown trace field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"bad trace query: {exc}") from None

    @property
    def request(self) -> evaluate.HTTPRequest | kafka.KafkaRequest | None:
        if self.kafka_api_key:
            key = self.kafka_api_key
            number = int(key) if key.isdigit() else kafka.API_KEY_NUMBERS[key.lower()]
            topics = tuple(t.strip() for t in self.kafka_topic.split(",") if t.strip())
            return kafka.KafkaRequest(number, self.kafka_api_version,
                                      self.kafka_client_id or None, topics)
        if not self.http_method:
            return None
        return evaluate.HTTPRequest(self.http_method.upper(), self.http_path)


@attrs.frozen
class TraceResult:
    query: TraceQuery
    result: evaluate.Result
    src: evaluate.Party
    dst: evaluate.Party
    #: the map states the resolver computed (None for a side that is not an endpoint)
    src_policy: EndpointPolicy | None
    dst_policy: EndpointPolicy | None
    mapstate_verdict: Verdict
    datapath: Any = None

    def to_dict(self) -> dict:
        out = self.result.to_dict()
        out["src_identity"] = self.src.identity.to_dict()
        out["dst_identity"] = self.dst.identity.to_dict()
        out["mapstate_verdict"] = self.mapstate_verdict.value
        if self.datapath is not None:
            out["datapath"] = self.datapath
        return out


DatapathTracer = Callable[[TraceResult], Any]
_datapath_tracer: DatapathTracer | None = None


def register_datapath_tracer(tracer: DatapathTracer | None) -> None:
    """The BPF half: a function taking the `TraceResult` (identities, both map states,
    packet) and returning what the loaded program did (any JSON-able value)."""
    global _datapath_tracer
    _datapath_tracer = tracer


def endpoint_labels(text: str, namespace: str) -> LabelSet:
    """Labels given on the command line (`k8s` source by default) plus the pod namespace
    label, unless they name a namespace or a reserved identity already."""
    labels = LabelSet.parse(text)
    if namespace and not labels.has("any", POD_NAMESPACE_LABEL) and not any(
            lb.source == "reserved" for lb in labels):
        labels = LabelSet(set(labels) | {Label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace)})
    return labels


def _identity_for(labels: LabelSet, cache: IdentityCache) -> Identity:
    known = cache.by_labels(labels)
    if known is not None:
        return known
    number = max([i.id for i in cache if MIN_ALLOCATED <= i.id < LOCAL_SCOPE],
                 default=MIN_ALLOCATED - 1) + 1
    identity = Identity(number, labels)
    cache.add(identity)
    return identity


def _mapstate_side(policy: EndpointPolicy | None, peer: Identity, direction: Direction,
                   proto: int, port: int, request) -> Verdict | None:
    if policy is None:
        return None
    decision = lookup(policy, peer.id, direction, proto, port)
    if decision.verdict == Verdict.REDIRECT and request is not None and not l7_allows(
            policy, decision.key, request):
        return Verdict.DENY
    return decision.verdict


def trace(query: TraceQuery, policies: Iterable[Policy],
          identities: Iterable[Identity] = (), mode: str = "default",
          datapath: bool = False) -> TraceResult:
    """Trace one packet through `policies`. `identities` are the known ones (the agent's);
    label sets not among them get a temporary number for this trace."""
    policies = list(policies)
    cache = IdentityCache([i for i in identities if not i.reserved])
    for prefix in sorted(cidr_prefixes(named_rules(policies))):
        cache.cidr_identity(prefix)
    parties = {}
    for side in ("src", "dst"):
        text, cidr = getattr(query, side), getattr(query, f"{side}_cidr")
        if cidr:
            parties[side] = evaluate.Party(cache.for_ip(cidr), endpoint=False)
        else:
            ident = _identity_for(endpoint_labels(text, query.namespace), cache)
            parties[side] = evaluate.Party(ident, endpoint=ident.id >= MIN_ALLOCATED
                                           or ident.reserved)
    src, dst = parties["src"], parties["dst"]
    proto = PROTOCOLS[query.proto.upper()]
    result = evaluate.verdict(policies, src, dst, query.dport, proto, query.request, mode)
    src_policy = resolve(policies, src.identity, cache, mode) if src.endpoint else None
    dst_policy = resolve(policies, dst.identity, cache, mode) if dst.endpoint else None
    sides = [_mapstate_side(src_policy, dst.identity, Direction.EGRESS, proto, query.dport,
                            query.request),
             _mapstate_side(dst_policy, src.identity, Direction.INGRESS, proto, query.dport,
                            query.request)]
    sides = [s for s in sides if s is not None]
    if Verdict.DENY in sides:
        mapstate_verdict = Verdict.DENY
    elif Verdict.REDIRECT in sides:
        mapstate_verdict = Verdict.REDIRECT
    else:
        mapstate_verdict = Verdict.ALLOW
    traced = TraceResult(query, result, src, dst, src_policy, dst_policy, mapstate_verdict)
    if datapath:
        if _datapath_tracer is None:
            raise UserError("no datapath tracer is available in this build")
        traced = attrs.evolve(traced, datapath=_datapath_tracer(traced))
    return traced
