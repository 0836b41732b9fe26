"""Cilium's validation of policy rules (its `pkg/policy/api/rule_validation.go`, `Sanitize`):
checks that run on each model right after it is structured, so a refusal names its field.

`CHECKS` maps a model to the check the parser runs on every instance of it; a check returns
the (possibly normalized) object or raises `FieldError` with the path below that object.
`UNSUPPORTED` lists Cilium fields pylium refuses by name rather than ignores.
`WARNINGS` maps a model to what is accepted in it but not enforced yet (`NOT_ENFORCED`):
each yields `(path below the object, message)`; the loader attaches them to the `Policy`."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from pylium.policy import k8s
from pylium.policy.dns import FQDNSelector
from pylium.policy.errors import FieldError
from pylium.policy.http import MISMATCH_ACTIONS, SUPPORTED_MISMATCH, HeaderMatch, PortRuleHTTP
from pylium.policy.kafka import API_KEYS, ROLES, PortRuleKafka
from pylium.policy.l4 import ICMPField, ICMPRule, IcmpType, PortProtocol, PortRule
from pylium.policy.rule import (
    CIDRRule,
    EgressDenyRule,
    EgressRule,
    IngressDenyRule,
    IngressRule,
    Rule,
)
from pylium.policy.selector import Requirement

#: Cilium's limits on list lengths in one rule
MAX_PORTS = 40
MAX_ICMP_FIELDS = 40

#: Cilium fields pylium knows but does not enforce yet: refused by name, never ignored
UNSUPPORTED = {
    "fromNodes": "node selectors (fromNodes) are not supported yet",
    "toNodes": "node selectors (toNodes) are not supported yet",
    "fromGroups": "cloud provider groups are not supported",
    "toGroups": "cloud provider groups are not supported",
    "authentication": "mutual authentication is not supported yet",
    "auth": "mutual authentication is not supported yet",
    "listener": "Envoy listeners (CiliumEnvoyConfig) are not supported",
    "serverNames": "TLS SNI matching is not supported yet",
    "originatingTLS": "TLS origination is not supported",
    "terminatingTLS": "TLS termination is not supported",
    "l7proto": "generic L7 parsers (l7proto) are not supported yet",
    "l7": "generic L7 rules (l7) are not supported yet",
    "log": "policy logging is not supported yet",
    "secret": "header values from secrets are not supported",
}

#: Cilium peer fields pylium accepts but cannot enforce yet. In an allow rule they select no
#: peers, so what they would allow stays denied (fail closed) and each use is a warning; in a
#: deny rule they would deny nothing, so there they are refused (`_check_egress_deny`).
NOT_ENFORCED = {
    "toFQDNs": "not enforced yet by pylium (no DNS proxy learns the names' addresses): "
               "selects no peers, so the traffic it would allow is denied",
    "toServices": "not enforced yet by pylium (service backends are not tracked yet): "
                  "selects no peers, so the traffic it would allow is denied",
}

#: ICMP type names per family, as Cilium accepts them in `icmps[].fields[].type`
ICMP_TYPES = {
    "IPv4": {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8,
             "EchoRequest": 8, "RouterAdvertisement": 9, "RouterSelection": 10,
             "TimeExceeded": 11, "ParameterProblem": 12, "Timestamp": 13,
             "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
             "ExtendedEchoReply": 43},
    "IPv6": {"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3,
             "ParameterProblem": 4, "EchoRequest": 128, "EchoReply": 129,
             "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
             "MulticastListenerDone": 132, "RouterSolicitation": 133,
             "RouterAdvertisement": 134, "NeighborSolicitation": 135,
             "NeighborAdvertisement": 136, "RedirectMessage": 137,
             "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161},
}


def _check_requirement(req: Requirement) -> Requirement:
    if req.operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
        raise FieldError("operator", f'"{req.operator}" is not an operator '
                                     "(In, NotIn, Exists, DoesNotExist)")
    if req.operator in ("In", "NotIn") and not req.values:
        raise FieldError("values", f"operator {req.operator} needs at least one value")
    if req.operator in ("Exists", "DoesNotExist") and req.values:
        raise FieldError("values", f"operator {req.operator} takes no values")
    return req


def _check_port_protocol(pp: PortProtocol) -> PortProtocol:
    if pp.end_port:
        if pp.is_named:
            raise FieldError("endPort", "endPort cannot be used with a named port")
        if not 0 < pp.end_port <= 65535:
            raise FieldError("endPort", f'"{pp.end_port}" is not a port')
        if pp.end_port < int(pp.port):
            raise FieldError("endPort", f"endPort {pp.end_port} is below port {pp.port}")
        if pp.end_port == int(pp.port):
            pp = attrs.evolve(pp, end_port=0)
    if pp.protocol not in ("TCP", "UDP", "SCTP", "ANY") and pp.port != "0":
        raise FieldError("port", f"protocol {pp.protocol} has no ports")
    return pp


def _check_port_rule(pr: PortRule) -> PortRule:
    if len(pr.ports) > MAX_PORTS:
        raise FieldError("ports", f"too many ports, the max is {MAX_PORTS}")
    l7 = pr.l7
    if l7 is None:
        return pr
    if sum(bool(x) for x in (l7.http, l7.kafka, l7.dns)) > 1:
        raise FieldError("rules", "multiple L7 protocol rule types specified in one rule")
    if l7.dns and not pr.ports:
        raise FieldError("rules.dns", "port 53 must be specified for DNS rules")
    for i, pp in enumerate(pr.ports):
        if pp.port == "0":
            raise FieldError(f"ports[{i}].port", "L7 rules can not be used when a port is 0")
        if pp.end_port:
            raise FieldError(f"ports[{i}].endPort", "L7 rules can not be used with port ranges")
        if not l7.dns and pp.protocol != "TCP":
            raise FieldError(f"ports[{i}].protocol",
                             f"L7 rules can only apply to TCP (not {pp.protocol}) "
                             "except for DNS rules")
    return pr


def _check_http(rule: PortRuleHTTP) -> PortRuleHTTP:
    for name in ("method", "path", "host"):
        try:
            re.compile(getattr(rule, name))
        except re.error as exc:
            raise FieldError(name, f"invalid regular expression: {exc}") from None
    return rule


def _check_header_match(match: HeaderMatch) -> HeaderMatch:
    if not match.name:
        raise FieldError("name", "a header name is required")
    action = match.mismatch.upper()
    if action and action not in MISMATCH_ACTIONS:
        raise FieldError("mismatch", f'"{match.mismatch}" is not one of '
                                     f"{', '.join(MISMATCH_ACTIONS)}")
    if action not in SUPPORTED_MISMATCH:
        raise FieldError("mismatch", f"{action} is not supported (pylium's proxy does not "
                                     "rewrite requests); use LOG or leave it empty")
    return attrs.evolve(match, mismatch=action)


def _check_kafka(rule: PortRuleKafka) -> PortRuleKafka:
    if rule.role and rule.api_key:
        raise FieldError("role", "role and apiKey cannot be used together")
    if rule.role and rule.role.lower() not in ROLES:
        raise FieldError("role", f'"{rule.role}" is not a role (produce, consume)')
    if rule.api_key and rule.api_key.lower() not in API_KEYS:
        raise FieldError("apiKey", f'"{rule.api_key}" is not a Kafka API key')
    if rule.api_version and not rule.api_version.isdigit():
        raise FieldError("apiVersion", f'"{rule.api_version}" is not a number')
    if len(rule.topic) > 255 or not re.fullmatch(r"[a-zA-Z0-9._-]*", rule.topic):
        raise FieldError("topic", f'"{rule.topic}" is not a valid topic name')
    return attrs.evolve(rule, role=rule.role.lower(), api_key=rule.api_key.lower())


def _check_fqdn(sel: FQDNSelector) -> FQDNSelector:
    if bool(sel.match_name) == bool(sel.match_pattern):
        raise FieldError("", "exactly one of matchName and matchPattern is required")
    if sel.match_name and not re.fullmatch(r"[-a-zA-Z0-9_.]+", sel.match_name):
        raise FieldError("matchName", f'"{sel.match_name}" is not a DNS name')
    if sel.match_pattern and not re.fullmatch(r"[-a-zA-Z0-9_.*]+", sel.match_pattern):
        raise FieldError("matchPattern", f'"{sel.match_pattern}" is not a DNS pattern')
    return FQDNSelector(sel.match_name.lower(), sel.match_pattern.lower())


def _check_cidr_rule(rule: CIDRRule) -> CIDRRule:
    outer = ipaddress.ip_network(rule.cidr)
    for i, exc in enumerate(rule.except_):
        inner = ipaddress.ip_network(exc)
        if inner.version != outer.version or not inner.subnet_of(outer):
            raise FieldError(f"except[{i}]", f"{exc} is not inside {rule.cidr}")
    return rule


def _check_icmp_field(f: ICMPField) -> ICMPField:
    if f.family not in ICMP_TYPES:
        raise FieldError("family", f'"{f.family}" is not a family (IPv4, IPv6)')
    if isinstance(f.type, str):
        number = ICMP_TYPES[f.family].get(f.type)
        if number is None:
            raise FieldError("type", f'"{f.type}" is not an {f.family} ICMP type')
        return attrs.evolve(f, type=IcmpType(number))
    return f


def _check_icmp_rule(rule: ICMPRule) -> ICMPRule:
    if len(rule.fields) > MAX_ICMP_FIELDS:
        raise FieldError("fields", f"too many types, the max is {MAX_ICMP_FIELDS}")
    return rule


def _check_peer_rule(rule, ingress: bool):
    if rule.icmps and rule.to_ports:
        raise FieldError("icmps", "the icmps block may only be present without toPorts; "
                                  "define a separate rule to use toPorts")
    for i, pr in enumerate(rule.to_ports):
        if ingress and pr.l7 is not None and pr.l7.dns:
            raise FieldError(f"toPorts[{i}].rules.dns", "DNS rules are not allowed on ingress")
    if not ingress and rule.services and rule.to_ports:
        raise FieldError("toServices", "combining toServices and toPorts is not supported")
    return rule


def _check_egress_deny(rule: EgressDenyRule) -> EgressDenyRule:
    if rule.to_fqdns:  # Cilium's EgressDenyRule has no toFQDNs
        raise FieldError("toFQDNs", "toFQDNs is not allowed in egressDeny rules")
    if rule.to_services:
        raise FieldError("toServices", "toServices is not enforced yet by pylium: in a deny "
                                       "rule it would deny nothing, so it is refused")
    return _check_peer_rule(rule, False)


def _check_rule(rule: Rule) -> Rule:
    if rule.endpoint_selector is None and rule.node_selector is None:
        raise FieldError("", "rule must have one of endpointSelector or nodeSelector")
    if rule.endpoint_selector is not None and rule.node_selector is not None:
        raise FieldError("nodeSelector", "rule cannot have both endpointSelector and "
                                         "nodeSelector")
    if rule.node_selector is not None:
        for name, items in (("ingress", rule.ingress), ("egress", rule.egress)):
            for i, item in enumerate(items):
                for j, pr in enumerate(item.to_ports):
                    if pr.l7 is not None:
                        raise FieldError(f"{name}[{i}].toPorts[{j}].rules",
                                         "host policies do not support L7 rules")
    return rule


def _check_np_spec(spec: k8s.NetworkPolicySpec) -> k8s.NetworkPolicySpec:
    for i, kind in enumerate(spec.policy_types):
        if kind not in ("Ingress", "Egress"):
            raise FieldError(f"policyTypes[{i}]", f'"{kind}" is not Ingress or Egress')
    return spec


CHECKS: dict[type, Callable[[Any], Any]] = {
    k8s.NetworkPolicySpec: _check_np_spec,
    Requirement: _check_requirement,
    PortProtocol: _check_port_protocol,
    k8s.NetworkPolicyPort: lambda p: _check_port_protocol(
        PortProtocol(p.port, p.end_port, p.protocol)) and p,
    PortRule: _check_port_rule,
    PortRuleHTTP: _check_http,
    HeaderMatch: _check_header_match,
    PortRuleKafka: _check_kafka,
    FQDNSelector: _check_fqdn,
    CIDRRule: _check_cidr_rule,
    k8s.IPBlock: lambda b: _check_cidr_rule(CIDRRule(b.cidr, b.except_)) and b,
    ICMPField: _check_icmp_field,
    ICMPRule: _check_icmp_rule,
    IngressRule: lambda r: _check_peer_rule(r, True),
    IngressDenyRule: lambda r: _check_peer_rule(r, True),
    EgressRule: lambda r: _check_peer_rule(r, False),
    EgressDenyRule: _check_egress_deny,
    Rule: _check_rule,
}


def _egress_warnings(rule: EgressRule) -> Iterator[tuple[str, str]]:
    for key, selected in (("toFQDNs", rule.to_fqdns), ("toServices", rule.to_services)):
        if selected:
            yield key, NOT_ENFORCED[key]


#: model → what its instances hold that is accepted but not enforced (exact type: an
#: EgressDenyRule is refused by CHECKS instead)
WARNINGS: dict[type, Callable[[Any], Iterable[tuple[str, str]]]] = {
    EgressRule: _egress_warnings,
}
