"""Kubernetes `networking.k8s.io/v1` NetworkPolicy: the model, and its translation into the
same `Rule` model Cilium uses (as Cilium's `pkg/k8s/network_policy.go` does)."""

from __future__ import annotations

import attrs

from pylium.identity.labels import NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL
from pylium.policy.l4 import PortProtocol, PortRule, PortValue, ProtocolName
from pylium.policy.rule import CIDR, CIDRRule, EgressRule, Entity, IngressRule, Rule
from pylium.policy.selector import EndpointSelector, Requirement

POD_NS = f"k8s:{POD_NAMESPACE_LABEL}"


@attrs.frozen
class IPBlock:
    cidr: CIDR
    except_: tuple[CIDR, ...] = attrs.field(default=(), metadata={"key": "except"})


@attrs.frozen
class NetworkPolicyPeer:
    pod_selector: EndpointSelector | None = None
    namespace_selector: EndpointSelector | None = None
    ip_block: IPBlock | None = attrs.field(default=None, metadata={"key": "ipBlock"})


@attrs.frozen
class NetworkPolicyPort:
    protocol: ProtocolName = ProtocolName("TCP")
    port: PortValue = PortValue("0")
    end_port: int = 0


@attrs.frozen
class NetworkPolicyIngressRule:
    from_: tuple[NetworkPolicyPeer, ...] = attrs.field(default=(), metadata={"key": "from"})
    ports: tuple[NetworkPolicyPort, ...] = ()


@attrs.frozen
class NetworkPolicyEgressRule:
    to: tuple[NetworkPolicyPeer, ...] = ()
    ports: tuple[NetworkPolicyPort, ...] = ()


@attrs.frozen
class NetworkPolicySpec:
    pod_selector: EndpointSelector
    policy_types: tuple[str, ...] = ()
    ingress: tuple[NetworkPolicyIngressRule, ...] = ()
    egress: tuple[NetworkPolicyEgressRule, ...] = ()


def _namespace_selector(sel: EndpointSelector) -> EndpointSelector:
    """Namespace labels become `io.cilium.k8s.namespace.labels.<key>` pod labels."""
    labels = tuple((f"k8s:{NAMESPACE_LABELS_PREFIX}{k}", v) for k, v in sel.match_labels)
    reqs = tuple(attrs.evolve(r, key=f"k8s:{NAMESPACE_LABELS_PREFIX}{r.key}")
                 for r in sel.match_expressions)
    out = EndpointSelector(tuple(sorted(labels)), reqs)
    if out.is_wildcard:  # every namespace: any pod
        out = EndpointSelector((), (Requirement(POD_NS, "Exists"),))
    return out


def _peer(peer: NetworkPolicyPeer, namespace: str) -> dict:
    if peer.ip_block is not None:
        return {"cidr_set": CIDRRule(peer.ip_block.cidr, peer.ip_block.except_)}
    pods = peer.pod_selector or EndpointSelector()
    if peer.namespace_selector is None:
        sel = pods.with_label(POD_NS, namespace)
    else:
        ns = _namespace_selector(peer.namespace_selector)
        sel = EndpointSelector(tuple(sorted(dict(pods.match_labels + ns.match_labels)
                                            .items())),
                               pods.match_expressions + ns.match_expressions)
    return {"endpoint": sel}


def _ports(ports: tuple[NetworkPolicyPort, ...]) -> tuple[PortRule, ...]:
    if not ports:
        return ()
    return (PortRule(tuple(PortProtocol(p.port, p.end_port, p.protocol) for p in ports)),)


def translate(spec: NetworkPolicySpec, namespace: str) -> Rule:
    types = set(spec.policy_types) or ({"Ingress", "Egress"} if spec.egress else {"Ingress"})
    ingress: list[IngressRule] = []
    egress: list[EgressRule] = []
    if "Ingress" in types:
        for item in spec.ingress:
            ports = _ports(item.ports)
            if not item.from_:  # no `from`: every source
                ingress.append(IngressRule(from_entities=(Entity("all"),), to_ports=ports))
            for peer in item.from_:
                got = _peer(peer, namespace)
                ingress.append(IngressRule(from_endpoints=(got["endpoint"],), to_ports=ports)
                               if "endpoint" in got else
                               IngressRule(from_cidr_set=(got["cidr_set"],), to_ports=ports))
        if not ingress:  # the type is listed but nothing is allowed: deny all
            ingress.append(IngressRule())
    if "Egress" in types:
        for item in spec.egress:
            ports = _ports(item.ports)
            if not item.to:
                egress.append(EgressRule(to_entities=(Entity("all"),), to_ports=ports))
            for peer in item.to:
                got = _peer(peer, namespace)
                egress.append(EgressRule(to_endpoints=(got["endpoint"],), to_ports=ports)
                              if "endpoint" in got else
                              EgressRule(to_cidr_set=(got["cidr_set"],), to_ports=ports))
        if not egress:
            egress.append(EgressRule())
    return Rule(endpoint_selector=spec.pod_selector.with_label(POD_NS, namespace),
                ingress=tuple(ingress), egress=tuple(egress))
