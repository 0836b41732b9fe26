"""Pod and namespace labels → the labels of the pod's endpoint (and so its identity).

Cilium's forms: the pod's own labels, the namespace's labels as
`io.cilium.k8s.namespace.labels.<key>`, the service account as
`io.cilium.k8s.policy.serviceaccount` and the cluster as `io.cilium.k8s.policy.cluster`
(the endpoint adds `io.kubernetes.pod.namespace` itself). Labels that change with every
rollout (`pod-template-hash`, ...) are left out, as Cilium's default label filter does, so a
new ReplicaSet does not mint new identities."""

from __future__ import annotations

import logging
from typing import Any

from pylium.endpoint.model import validate_labels
from pylium.errors import UserError
from pylium.identity.labels import NAMESPACE_LABELS_PREFIX

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
#: label keys that say which rollout a pod belongs to, not what it is
UNSTABLE_KEYS = frozenset({"pod-template-hash", "controller-revision-hash",
                           "pod-template-generation", "statefulset.kubernetes.io/pod-name"})


def endpoint_labels(pod: dict[str, Any], namespace: dict[str, Any] | None,
                    cluster: str = "default") -> dict[str, str]:
    """The endpoint labels of `pod` in `namespace` (None: namespace not known yet)."""
    meta = pod.get("metadata") or {}
    out: dict[str, str] = {}
    for key, value in (meta.get("labels") or {}).items():
        if key not in UNSTABLE_KEYS:
            out[key] = str(value)
    ns_labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    for key, value in ns_labels.items():
        out[f"{NAMESPACE_LABELS_PREFIX}{key}"] = str(value)
    account = (pod.get("spec") or {}).get("serviceAccountName")
    if account:
        out[SERVICE_ACCOUNT_LABEL] = account
    if cluster:
        out[CLUSTER_LABEL] = cluster
    valid: dict[str, str] = {}
    for key, value in out.items():
        try:
            valid.update(validate_labels({key: value}))
        except UserError as exc:  # e.g. a namespace label key too long once prefixed
            log.warning("pod %s/%s: label left out of its identity: %s",
                        meta.get("namespace"), meta.get("name"), exc)
    return dict(sorted(valid.items()))
