"""Policy objects from the API server → `Policy` models, and the status Cilium writes back.

The API server's copy is the source of truth, so these policies go into the repository only
(not the agent's KV-store policy store); a relist after an agent restart brings them back.
Every rule carries Cilium's derived-from labels (`io.cilium.k8s.policy.*`), which is how
`pylium policy get` tells where it came from."""

from __future__ import annotations

import datetime
import json
from typing import Any

import attrs
from pylium.policy.load import CCNP, CNP, KNP, POLICY_KINDS, load_text
from pylium.policy.rule import Policy, RuleLabel

#: the metadata the parser needs; the rest (managedFields, selfLink, ...) is the server's
_KEEP_META = ("name", "namespace", "labels")


def to_policies(kind: str, obj: dict[str, Any]) -> list[Policy]:
    """Parse one API object of `kind`; raises `PolicyError` (with field paths) if invalid."""
    meta = obj.get("metadata") or {}
    doc: dict[str, Any] = {
        "apiVersion": POLICY_KINDS[kind],
        "kind": kind,
        "metadata": {k: meta[k] for k in _KEEP_META if meta.get(k)},
    }
    if kind == CCNP:
        doc["metadata"].pop("namespace", None)
    for field in ("spec", "specs", "description"):
        if obj.get(field) is not None:
            doc[field] = obj[field]
    if kind == KNP and "spec" not in doc:
        doc["spec"] = {"podSelector": {}}
    policies = load_text(json.dumps(doc), meta.get("name") or "")
    extra = (RuleLabel("io.cilium.k8s.policy.derived-from", kind, "k8s"),
             RuleLabel("io.cilium.k8s.policy.name", str(meta.get("name") or ""), "k8s"),
             RuleLabel("io.cilium.k8s.policy.namespace", str(meta.get("namespace") or ""),
                       "k8s"),
             RuleLabel("io.cilium.k8s.policy.uid", str(meta.get("uid") or ""), "k8s"))
    return [attrs.evolve(p, rules=tuple(attrs.evolve(r, labels=r.labels + extra)
                                        for r in p.rules))
            for p in policies]


def node_status(node: str, *, ok: bool, error: str = "", revision: int = 0,
                warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    """A merge patch of `status.nodes.<node>` as Cilium writes it for CNP/CCNP."""
    entry: dict[str, Any] = {
        "ok": ok,
        "enforcing": ok,
        "lastUpdated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "localPolicyRevision": revision,
        "error": error or None,  # null removes an earlier error
        "annotations": {"pylium.io/warnings": "; ".join(warnings)} if warnings else None,
    }
    return {"status": {"nodes": {node: entry}}}


CRD_PLURALS = {CNP: "ciliumnetworkpolicies", CCNP: "ciliumclusterwidenetworkpolicies"}
