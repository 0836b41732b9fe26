"""Structuring: plain data (from YAML/JSON) into the frozen policy models, through one cattrs
converter (camelCase keys, unknown keys refused), with every problem reported by its path.

Keys match case-insensitively when they are not exact, as Go's JSON decoder (and so Cilium)
does. Each model is checked right after it is built (`validate.CHECKS`); every error names
its path: `spec.ingress[0].toPorts[0].ports[0].port: "99999" is not a port`. `warnings_in`
names, the same way, what was accepted but is not enforced (`validate.WARNINGS`). Reading
documents and files is `load`'s job."""

from __future__ import annotations

import ipaddress
import json
import re
import typing
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from pylium.policy import k8s
from pylium.policy.dns import FQDNSelector
from pylium.policy.errors import FieldError, PolicyError, PolicyWarning, join_path
from pylium.policy.http import HeaderMatch, PortRuleHTTP
from pylium.policy.kafka import PortRuleKafka
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
    Rule,
    RuleLabel,
    Service,
    ServiceSelector,
)
from pylium.policy.selector import EndpointSelector, Requirement
from pylium.policy.validate import CHECKS, ICMP_TYPES, UNSUPPORTED, WARNINGS


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
    """A CIDR (or a bare address, as a host prefix) in canonical form; ValueError if not."""
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


def _structure_icmp_type(value: Any, _t=None):
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an ICMP type")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 0 <= number <= 255:
            raise ValueError(f'"{value}" is not an ICMP type (0-255)')
        return number
    if isinstance(value, str) and any(value in names for names in ICMP_TYPES.values()):
        return value  # resolved with the family by validate.CHECKS
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


# models ------------------------------------------------------------------------------------

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
        out.append(f"{join_path(path, exc.sub) or '(top)'}: {exc}")
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


def warnings_in(obj: Any, path: str) -> list[PolicyWarning]:
    """Every `validate.WARNINGS` finding in `obj` (a structured model or a tuple of them)
    and the models inside it, each named by its document path."""
    if isinstance(obj, tuple):
        return [w for i, item in enumerate(obj) for w in warnings_in(item, f"{path}[{i}]")]
    keys = KEYS.get(type(obj))
    if keys is None:
        return []
    check = WARNINGS.get(type(obj))
    out = [PolicyWarning(join_path(path, sub), message)
           for sub, message in (check(obj) if check else ())]
    for name, key in keys.items():
        value = getattr(obj, name)
        if isinstance(value, tuple) or type(value) in KEYS:
            out += warnings_in(value, join_path(path, key))
    return out
