"""Cilium's namespace translation of CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
rules (its `pkg/k8s/apis/cilium.io/utils`): a policy's namespace becomes label requirements
on the selected endpoints and on their peers. NetworkPolicy has its own in `k8s.translate`."""

from __future__ import annotations

import attrs

from pylium.identity.labels import (
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCE_RESERVED,
)
from pylium.policy.rule import Rule
from pylium.policy.selector import EndpointSelector, Requirement

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

