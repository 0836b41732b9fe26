"""Policy documents in, `Policy` models out: one cattrs converter (camelCase keys,
unknown keys refused), Cilium's validation, and its namespace translation.

Accepted: YAML (one or many documents) or JSON; `cilium.io/v2` CiliumNetworkPolicy /
CiliumClusterwideNetworkPolicy with `spec` and/or `specs`; `networking.k8s.io/v1`
NetworkPolicy; bare JSON lists of rules (what `cilium policy import` takes). Keys match
case-insensitively when they are not exact, as Go's JSON decoder (and so Cilium) does.
Every error names its path: `spec.ingress[0].toPorts[0].ports[0].port: "99999" is not a port`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from pylium.errors import UserError
from pylium.identity.labels import (
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCE_RESERVED,
)
from pylium.policy import k8s
from pylium.policy.dns import FQDNSelector
from pylium.policy.http import MISMATCH_ACTIONS, SUPPORTED_MISMATCH, HeaderMatch, PortRuleHTTP
from pylium.policy.kafka import API_KEYS, ROLES, PortRuleKafka
from pylium.policy.l4 import (
    PORT_PROTOCOLS,
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
from pylium.policy.rule import (
    CIDR,
    ENTITIES,
    CIDRRule,
    DefaultDeny,
    EgressDenyRule,
    EgressRule,
    Entity,
    IngressDenyRule,
    IngressRule,
    K8sServiceNamespace,
    Policy,
    Rule,
    RuleLabel,
    Service,
    ServiceSelector,
)
from pylium.policy.selector import EndpointSelector, Requirement

CILIUM_API = "cilium.io/v2"
K8S_API = "networking.k8s.io/v1"
CNP, CCNP, KNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"
POLICY_KINDS = {CNP: CILIUM_API, CCNP: CILIUM_API, KNP: K8S_API}
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


class PolicyError(UserError):
    """One or more problems in policy input; `errors` holds one `path: message` each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class FieldError(ValueError):
    """A validation failure below the current object: `sub` is the relative path."""

    def __init__(self, sub: str, message: str):
        self.sub = sub
        super().__init__(message)


def _camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _key(field: attrs.Attribute) -> str:
    return field.metadata.get("key") or _camel(field.name)


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


# leaf values -------------------------------------------------------------------------------

def _structure_str(value: Any, _t=None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{json.dumps(value, default=str)} is not a string")
    return str(value)


def _structure_bool(value: Any, _t=None) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{json.dumps(value, default=str)} is not true or false")
    return value


def _structure_int(value: Any, _t=None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if not isinstance(value, int):
        raise ValueError(f"{json.dumps(value, default=str)} is not a number")
    return value


_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _structure_port(value: Any, _t=None) -> PortValue:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{json.dumps(value, default=str)} is not a port")
    text = str(value).strip()
    if text.isdigit():
        if int(text) > 65535:
            raise ValueError(f'"{text}" is not a port (0-65535)')
        return PortValue(str(int(text)))
    name = text.lower()
    if (not text or len(text) > 15 or not _SVC_NAME.match(name) or "--" in name
            or not re.search("[a-z]", name)):
        raise ValueError(f'"{text}" is not a port (a number 0-65535 or a port name)')
    return PortValue(name)


def _structure_protocol(value: Any, _t=None) -> ProtocolName:
    text = _structure_str(value).upper()
    if text == "":
        return ProtocolName("ANY")
    if text not in PORT_PROTOCOLS:
        raise ValueError(f'"{value}" is not a protocol (TCP, UDP, SCTP, ANY)')
    return ProtocolName(text)


def parse_cidr(value: Any, allow_bare_ip: bool = True) -> str:
    text = _structure_str(value).strip()
    if "/" not in text and not allow_bare_ip:
        raise ValueError(f'"{text}" is not a CIDR (address/prefix length)')
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f'"{text}" is not a CIDR') from None


def _structure_entity(value: Any, _t=None) -> Entity:
    text = _structure_str(value)
    if text not in ENTITIES:
        raise ValueError(f'"{text}" is not an entity ({", ".join(sorted(ENTITIES))})')
    return Entity(text)


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


def _structure_icmp_type(value: Any, _t=None):
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an ICMP type")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 0 <= number <= 255:
            raise ValueError(f'"{value}" is not an ICMP type (0-255)')
        return number
    if isinstance(value, str) and any(value in names for names in ICMP_TYPES.values()):
        return value  # resolved with the family in _check_icmp_field
    raise ValueError(f"{json.dumps(value, default=str)} is not an ICMP type")


def _structure_match_labels(value: Any, _t=None) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError("matchLabels must be a mapping of label keys to values")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise FieldError(f"[{key!r}]", "label keys must be non-empty strings")
        out[key] = "" if val is None else _structure_str(val)
    return tuple(sorted(out.items()))


# validation of whole objects (Cilium's sanitize) ------------------------------------------

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
    EgressDenyRule: lambda r: _check_peer_rule(r, False),
    Rule: _check_rule,
}

MODELS = (Requirement, EndpointSelector, PortProtocol, L7Rules, PortRule, PortDenyRule,
          ICMPField, ICMPRule, PortRuleHTTP, HeaderMatch, PortRuleKafka, FQDNSelector,
          CIDRRule, K8sServiceNamespace, ServiceSelector, Service, IngressRule,
          IngressDenyRule, EgressRule, EgressDenyRule, DefaultDeny, RuleLabel, Rule,
          k8s.IPBlock, k8s.NetworkPolicyPeer, k8s.NetworkPolicyPort,
          k8s.NetworkPolicyIngressRule, k8s.NetworkPolicyEgressRule, k8s.NetworkPolicySpec)

#: for each model: attribute name → document key (to name fields in error paths)
KEYS: dict[type, dict[str, str]] = {}


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(PortValue, _structure_port)
    conv.register_structure_hook(ProtocolName, _structure_protocol)
    conv.register_structure_hook(CIDR, lambda v, _t: CIDR(parse_cidr(v)))
    conv.register_structure_hook(Entity, _structure_entity)
    conv.register_structure_hook(IcmpType, _structure_icmp_type)
    for model in MODELS:
        _register_model(conv, model)
    return conv


def _register_model(conv: cattrs.Converter, model: type) -> None:
    fields = attrs.fields(model)
    keys = {f.name: _key(f) for f in fields}
    KEYS[model] = keys
    overrides = {f.name: override(rename=keys[f.name]) for f in fields}
    if model is EndpointSelector:
        overrides["match_labels"] = override(rename="matchLabels",
                                             struct_hook=_structure_match_labels)
    generated = make_dict_structure_fn(model, conv, _cattrs_forbid_extra_keys=True,
                                       **overrides)
    lower = {k.lower(): k for k in keys.values()}
    tuple_keys = {keys[f.name] for f in fields if _is_tuple(f.type)} - {"matchLabels"}
    check = CHECKS.get(model)

    def structure(value: Any, _t=None):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {json.dumps(value, default=str)}")
        data = {}
        for key, item in value.items():
            name = key if key in lower.values() else lower.get(str(key).lower())
            if name is None:
                if key in UNSUPPORTED:
                    raise FieldError(str(key), UNSUPPORTED[key])
                raise FieldError(str(key), "unknown field")
            if name in tuple_keys and item is not None and not isinstance(item, list):
                raise FieldError(name, "must be a list")
            if item is None and (name in tuple_keys or name == "matchLabels"):
                continue  # `ingress:` with nothing after it: absent, as in Go
            data[name] = item
        obj = generated(data, model)
        return check(obj) if check else obj

    conv.register_structure_hook(model, structure)


CONVERTER = _make_converter()


def _paths(exc: BaseException, path: str, model: type | None = None) -> list[str]:
    """Like cattrs' `transform_error`, but with document keys and `path: message`."""
    out: list[str] = []
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        keys = KEYS.get(exc.cl, {})
        for sub, note in with_notes:
            name = keys.get(note.name, note.name)
            out += _paths(sub, f"{path}.{name}" if path else name)
        for sub in without:
            out += _paths(sub, path)
    elif isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            out += _paths(sub, f"{path}[{note.index!r}]")
        for sub in without:
            out += _paths(sub, path)
    elif isinstance(exc, FieldError):
        sub = exc.sub
        full = path if not sub else (f"{path}{sub}" if sub.startswith("[") or not path
                                     else f"{path}.{sub}")
        out.append(f"{full or '(top)'}: {exc}")
    elif isinstance(exc, KeyError):
        out.append(f"{path}: required field missing")
    else:
        out.append(f"{path or '(top)'}: {exc}")
    return out


def structure(data: Any, model: type, path: str):
    """Structure `data` into `model`; raises PolicyError with every problem's path."""
    try:
        return CONVERTER.structure(data, model)
    except (ClassValidationError, IterableValidationError, FieldError, ValueError,
            KeyError, TypeError) as exc:
        raise PolicyError(_paths(exc, path)) from None


# namespace translation (Cilium's pkg/k8s/apis/cilium.io/utils) -----------------------------

POD_NS_K8S = f"{SOURCE_K8S}:{POD_NAMESPACE_LABEL}"


def _peer_selector(sel: EndpointSelector, namespace: str, matches_init: bool,
                   is_requires: bool) -> EndpointSelector:
    if not is_requires and sel.has_source(SOURCE_RESERVED):
        return sel  # reserved identities live in no namespace
    if sel.has_key(SOURCE_K8S, POD_NAMESPACE_LABEL) or sel.has_key(SOURCE_ANY,
                                                                   POD_NAMESPACE_LABEL):
        return sel
    if not namespace:
        if matches_init:
            return sel
        return sel.with_requirements((Requirement(POD_NS_K8S, "Exists"),))
    if sel.has_key_prefix(SOURCE_K8S, NAMESPACE_LABELS_PREFIX) or sel.has_key_prefix(
            SOURCE_ANY, NAMESPACE_LABELS_PREFIX):
        return sel
    return sel.with_label(POD_NS_K8S, namespace)


def _translate_peers(item, namespace: str, matches_init: bool, ingress: bool):
    eps = tuple(_peer_selector(s, namespace, matches_init, False) for s in item.endpoints)
    reqs = tuple(_peer_selector(s, namespace, matches_init, True) for s in item.requires)
    if ingress:
        return attrs.evolve(item, from_endpoints=eps, from_requires=reqs)
    return attrs.evolve(item, to_endpoints=eps, to_requires=reqs)


def translate_namespace(rule: Rule, namespace: str) -> Rule:
    """Apply Cilium's CNP/CCNP translation: a namespaced rule selects endpoints of its
    namespace and, unless a peer selector names a namespace, peers of its namespace; a
    cluster-wide rule's peer selectors match only pods (those with a namespace label)."""
    subject = rule.endpoint_selector
    if subject is not None and namespace:
        subject = subject.with_label(POD_NS_K8S, namespace)
    matches_init = rule.endpoint_selector is not None and rule.endpoint_selector.has_key(
        SOURCE_RESERVED, "init")
    return attrs.evolve(
        rule, endpoint_selector=subject,
        ingress=tuple(_translate_peers(i, namespace, matches_init, True) for i in rule.ingress),
        ingress_deny=tuple(_translate_peers(i, namespace, matches_init, True)
                           for i in rule.ingress_deny),
        egress=tuple(_translate_peers(i, namespace, matches_init, False) for i in rule.egress),
        egress_deny=tuple(_translate_peers(i, namespace, matches_init, False)
                          for i in rule.egress_deny))


# documents ------------------------------------------------------------------------------

_TOP_KEYS = {"apiversion": "apiVersion", "kind": "kind", "metadata": "metadata",
             "spec": "spec", "specs": "specs", "description": "description",
             "status": "status"}
_META_KEYS = {"name", "namespace", "labels", "annotations", "uid", "resourceVersion",
              "generation", "creationTimestamp", "managedFields", "finalizers",
              "ownerReferences", "generateName", "description"}


def _document(doc: Any, prefix: str, default_name: str) -> list[Policy]:
    if isinstance(doc, list):
        rules = structure(doc, tuple[Rule, ...], prefix)
        name = default_name or "rules"
        return [Policy("RuleList", name, "", rules, source=doc)]
    if not isinstance(doc, dict):
        raise PolicyError([f"{prefix or '(top)'}: expected a policy document or a list of "
                           "rules"])
    p = f"{prefix}." if prefix else ""
    top: dict[str, Any] = {}
    for key, value in doc.items():
        name = _TOP_KEYS.get(str(key).lower())
        if name is None:
            raise PolicyError([f"{p}{key}: unknown field"])
        top[name] = value
    kind = top.get("kind")
    if kind is None:
        raise PolicyError([f"{p}kind: required field missing"])
    if kind not in POLICY_KINDS:
        raise PolicyError([f"{p}kind: {kind!r} is not a policy kind (expected "
                           f"{', '.join(POLICY_KINDS)})"])
    api = top.get("apiVersion")
    if api != POLICY_KINDS[kind]:
        raise PolicyError([f"{p}apiVersion: {api!r} is not valid for {kind} (expected "
                           f"{POLICY_KINDS[kind]!r})"])
    meta = top.get("metadata") or {}
    if not isinstance(meta, dict):
        raise PolicyError([f"{p}metadata: expected a mapping"])
    for key in meta:
        if key not in _META_KEYS:
            raise PolicyError([f"{p}metadata.{key}: unknown field"])
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError([f"{p}metadata.name: required field missing"])
    description = str(top.get("description") or meta.get("description") or "")
    if kind == KNP:
        if "specs" in top:
            raise PolicyError([f"{p}specs: unknown field for NetworkPolicy"])
        namespace = str(meta.get("namespace") or "default")
        spec = structure(top.get("spec"), k8s.NetworkPolicySpec, f"{p}spec")
        return [Policy(kind, name, namespace, (k8s.translate(spec, namespace),),
                       description, source=doc)]
    namespace = "" if kind == CCNP else str(meta.get("namespace") or "default")
    if kind == CCNP and meta.get("namespace"):
        raise PolicyError([f"{p}metadata.namespace: a cluster-wide policy has no namespace"])
    rules: list[Rule] = []
    errors: list[str] = []
    if "spec" not in top and "specs" not in top:
        raise PolicyError([f"{p}spec: required field missing (spec or specs)"])
    for field in ("spec", "specs"):
        if field not in top:
            continue
        try:
            if field == "spec":
                rules.append(structure(top["spec"], Rule, f"{p}spec"))
            else:
                rules.extend(structure(top["specs"], tuple[Rule, ...], f"{p}specs"))
        except PolicyError as exc:
            errors += exc.errors
    if errors:
        raise PolicyError(errors)
    rules = [translate_namespace(r, namespace) for r in rules]
    return [Policy(kind, name, namespace, tuple(rules), description, source=doc)]


def _template_error(text: str) -> str | None:
    for number, line in enumerate(text.splitlines(), 1):
        if "{{" in line and not line.lstrip().startswith("#"):
            return (f"line {number}: unrendered Go template placeholder "
                    f"{line.strip()!r}; render the template before loading it")
    return None


def load_text(text: str, name: str = "") -> list[Policy]:
    """Parse YAML or JSON text holding one or more policy documents or a rule list."""
    template = _template_error(text)
    if template:
        raise PolicyError([template])
    stripped = text.lstrip()
    docs: list[Any]
    if stripped.startswith(("[", "{")):
        try:
            docs = [json.loads(text)]
        except ValueError:
            docs = None  # maybe YAML flow style
    else:
        docs = None
    if docs is None:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            raise PolicyError([f"{where}not valid YAML or JSON: "
                               f"{getattr(exc, 'problem', None) or exc}"]) from None
    if not docs:
        raise PolicyError(["(top): no policy documents found"])
    policies: list[Policy] = []
    errors: list[str] = []
    for index, doc in enumerate(docs):
        prefix = f"documents[{index}]" if len(docs) > 1 else ""
        try:
            policies += _document(doc, prefix, name)
        except PolicyError as exc:
            errors += exc.errors
    if errors:
        raise PolicyError(errors)
    return policies


def load_file(path: str | Path) -> list[Policy]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return load_text(text, path.stem)
    except PolicyError as exc:
        raise PolicyError([f"{path}: {e}" for e in exc.errors]) from None


def load_files(paths: Iterable[str | Path]) -> list[Policy]:
    """Load every file; raise one PolicyError listing the problems of all of them."""
    policies: list[Policy] = []
    errors: list[str] = []
    for path in paths:
        try:
            policies += load_file(path)
        except PolicyError as exc:
            errors += exc.errors
    if errors:
        raise PolicyError(errors)
    return policies


def from_source(kind: str, name: str, source: Any) -> list[Policy]:
    """Re-parse a stored document (the policy store persists `Policy.source`)."""
    return _document(source, "", name if kind == "RuleList" else "")
