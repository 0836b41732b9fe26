"""Rules, as Cilium's `api.Rule`: who is selected (`endpointSelector` / `nodeSelector`) and
what may reach it (`ingress`, `ingressDeny`) or what it may reach (`egress`, `egressDeny`).

`Policy` is one named document (a CNP, CCNP, NetworkPolicy, or a bare JSON rule list) holding
its rules after Cilium's namespace translation (see `namespace.translate_namespace`)."""

from __future__ import annotations

from typing import NewType

import attrs

from pylium.policy.dns import FQDNSelector
from pylium.policy.errors import PolicyWarning
from pylium.policy.l4 import ICMPRule, PortDenyRule, PortRule
from pylium.policy.selector import EndpointSelector

#: an IPv4/IPv6 prefix in canonical text form, validated by the parser
CIDR = NewType("CIDR", str)
#: one of ENTITIES
Entity = NewType("Entity", str)

ENTITIES = frozenset({"all", "world", "world-ipv4", "world-ipv6", "cluster", "host",
                      "remote-node", "kube-apiserver", "ingress", "init", "health",
                      "unmanaged", "none"})


@attrs.frozen
class CIDRRule:
    cidr: CIDR
    except_: tuple[CIDR, ...] = attrs.field(default=(), metadata={"key": "except"})


@attrs.frozen
class K8sServiceNamespace:
    service_name: str = ""
    namespace: str = ""


@attrs.frozen
class ServiceSelector:
    selector: EndpointSelector
    namespace: str = ""


@attrs.frozen
class Service:
    k8s_service: K8sServiceNamespace | None = None
    k8s_service_selector: ServiceSelector | None = None


class _Peers:
    """Direction-neutral accessors shared by the four rule kinds."""

    @property
    def l3_present(self) -> bool:
        """True if the rule names any L3 peer (fromRequires alone does not)."""
        return bool(self.endpoints or self.cidrs or self.cidr_sets or self.entities
                    or self.services or self.fqdns)

    @property
    def l4_present(self) -> bool:
        return bool(self.to_ports or self.icmps)


@attrs.frozen
class IngressRule(_Peers):
    from_endpoints: tuple[EndpointSelector, ...] = ()
    from_requires: tuple[EndpointSelector, ...] = ()
    from_cidr: tuple[CIDR, ...] = attrs.field(default=(), metadata={"key": "fromCIDR"})
    from_cidr_set: tuple[CIDRRule, ...] = attrs.field(default=(),
                                                      metadata={"key": "fromCIDRSet"})
    from_entities: tuple[Entity, ...] = ()
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPRule, ...] = ()

    endpoints = property(lambda self: self.from_endpoints)
    requires = property(lambda self: self.from_requires)
    cidrs = property(lambda self: self.from_cidr)
    cidr_sets = property(lambda self: self.from_cidr_set)
    entities = property(lambda self: self.from_entities)
    services = property(lambda self: ())
    fqdns = property(lambda self: ())


@attrs.frozen
class IngressDenyRule(IngressRule):
    to_ports: tuple[PortDenyRule, ...] = ()


@attrs.frozen
class EgressRule(_Peers):
    to_endpoints: tuple[EndpointSelector, ...] = ()
    to_requires: tuple[EndpointSelector, ...] = ()
    to_cidr: tuple[CIDR, ...] = attrs.field(default=(), metadata={"key": "toCIDR"})
    to_cidr_set: tuple[CIDRRule, ...] = attrs.field(default=(), metadata={"key": "toCIDRSet"})
    to_entities: tuple[Entity, ...] = ()
    to_services: tuple[Service, ...] = ()
    to_fqdns: tuple[FQDNSelector, ...] = attrs.field(default=(), metadata={"key": "toFQDNs"})
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPRule, ...] = ()

    endpoints = property(lambda self: self.to_endpoints)
    requires = property(lambda self: self.to_requires)
    cidrs = property(lambda self: self.to_cidr)
    cidr_sets = property(lambda self: self.to_cidr_set)
    entities = property(lambda self: self.to_entities)
    services = property(lambda self: self.to_services)
    fqdns = property(lambda self: self.to_fqdns)


@attrs.frozen
class EgressDenyRule(EgressRule):
    to_ports: tuple[PortDenyRule, ...] = ()


@attrs.frozen
class DefaultDeny:
    ingress: bool | None = None
    egress: bool | None = None


@attrs.frozen
class RuleLabel:
    key: str
    value: str = ""
    source: str = ""

    def __str__(self) -> str:
        text = f"{self.source}:{self.key}" if self.source else self.key
        return f"{text}={self.value}" if self.value else text


@attrs.frozen
class Rule:
    endpoint_selector: EndpointSelector | None = None
    node_selector: EndpointSelector | None = None
    ingress: tuple[IngressRule, ...] = ()
    ingress_deny: tuple[IngressDenyRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    egress_deny: tuple[EgressDenyRule, ...] = ()
    labels: tuple[RuleLabel, ...] = ()
    description: str = ""
    enable_default_deny: DefaultDeny = DefaultDeny()

    @property
    def subject(self) -> EndpointSelector:
        """The selector of the endpoints this rule applies to."""
        return self.endpoint_selector if self.endpoint_selector is not None \
            else self.node_selector

    def default_deny(self, ingress: bool) -> bool:
        """Cilium: a direction defaults to deny once the rule has rules in it, unless
        `enableDefaultDeny` says otherwise."""
        explicit = self.enable_default_deny.ingress if ingress \
            else self.enable_default_deny.egress
        if explicit is not None:
            return explicit
        return bool(self.ingress or self.ingress_deny) if ingress \
            else bool(self.egress or self.egress_deny)

    def has_direction(self, ingress: bool) -> bool:
        return bool(self.ingress or self.ingress_deny) if ingress \
            else bool(self.egress or self.egress_deny)


KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy", "RuleList")


@attrs.frozen
class Policy:
    """One policy document: its kind, name, namespace ("" for cluster-wide and bare rule
    lists) and its rules, already translated for the namespace."""

    kind: str
    name: str
    namespace: str = ""
    rules: tuple[Rule, ...] = ()
    description: str = ""
    #: the document as given (kept so the store can persist and re-parse it)
    source: dict | list | None = attrs.field(default=None, eq=False, repr=False)
    #: what the document holds that is accepted but not enforced yet (re-derived on re-parse)
    warnings: tuple[PolicyWarning, ...] = attrs.field(default=(), eq=False)

    @property
    def ref(self) -> str:
        """`namespace/name` for namespaced policies, `name` for cluster-wide ones."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def rule_name(self, index: int) -> str:
        rule = self.rules[index]
        label_names = [lb.value for lb in rule.labels if lb.key == "name" and lb.value]
        base = self.ref if self.kind != "RuleList" else (label_names[0] if label_names
                                                          else self.name)
        return base if len(self.rules) == 1 else f"{base}[{index}]"
