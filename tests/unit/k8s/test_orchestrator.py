"""The kubernetes orchestrator's handlers against the real policy repository: API objects in,
rules with Cilium's derived-from labels out; status-only updates ignored; an invalid update
keeps the previous version (fail closed); pod + namespace labels reach endpoints."""

from __future__ import annotations

import asyncio
import types

import attrs
import pytest
from pylium.api import OrchestratorRecord
from pylium.errors import PluginError
from pylium.identity.cache import IdentityCache
from pylium.plugins import make_plugin_manager
from pylium.policy.engine import PolicyEngine
from pylium.policy.repository import PolicyRepository
from pylium_orchestrator_k8s.informer import Informer
from pylium_orchestrator_k8s.labels import endpoint_labels
from pylium_orchestrator_k8s.orchestrator import KubernetesOrchestrator, conflist
from pylium_orchestrator_k8s.policies import node_status


def _knp(name="allow-web", generation=1, port=80, ns="shop"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "uid": "u-1", "generation": generation,
                         "resourceVersion": "7", "selfLink": "/x",
                         "managedFields": [{"manager": "kubectl"}],
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"protocol": "TCP", "port": port}]}]}}


@attrs.define
class FakeEndpoint:
    id: int
    name: str
    namespace: str
    labels: dict


class FakeEndpoints:
    def __init__(self, eps):
        self.eps = {ep.id: ep for ep in eps}
        self.label_resolver = None
        self.calls = []

    def list(self):
        return list(self.eps.values())

    async def set_labels(self, ep_id, labels):
        self.calls.append((ep_id, labels))
        self.eps[ep_id] = attrs.evolve(self.eps[ep_id], labels=labels)


def _orchestrator(endpoints=None):
    repository = PolicyRepository()
    engine = PolicyEngine(repository, IdentityCache(), "default")
    policy = types.SimpleNamespace(repository=repository, engine=engine)
    context = types.SimpleNamespace(node=types.SimpleNamespace(name="node-a"),
                                    options={"node_name": "node-a"}, endpoints=endpoints,
                                    policy=policy)
    orch = KubernetesOrchestrator.from_context(context)
    for kind in ("Namespace", "Pod"):
        orch.informers[kind] = Informer(kind, "v1", None, None)
    return orch, repository


def test_registered_as_the_kubernetes_orchestrator():
    record = make_plugin_manager().select("orchestrator", "kubernetes")
    assert isinstance(record, OrchestratorRecord)
    assert record.backend is KubernetesOrchestrator


def test_network_policy_lifecycle_in_the_repository():
    orch, repo = _orchestrator()

    async def run():
        await orch._on_policy("NetworkPolicy", "ADDED", _knp())
        assert [p.ref for p in repo.policies()] == ["shop/allow-web"]
        rule = repo.policies()[0].rules[0]
        labels = {str(lb) for lb in rule.labels}
        assert "k8s:io.cilium.k8s.policy.derived-from=NetworkPolicy" in labels
        assert "k8s:io.cilium.k8s.policy.namespace=shop" in labels
        revision = repo.revision
        # same generation (a status or metadata update): nothing re-imported
        await orch._on_policy("NetworkPolicy", "MODIFIED", _knp())
        assert repo.revision == revision
        # an invalid new generation: refused, the previous version stays enforced
        await orch._on_policy("NetworkPolicy", "MODIFIED", _knp(generation=2, port=99999))
        assert repo.revision == revision and len(repo.policies()) == 1
        assert "99999" in orch.policy_errors["NetworkPolicy shop/allow-web"]
        await orch._on_policy("NetworkPolicy", "MODIFIED", _knp(generation=3, port=8080))
        assert repo.revision == revision + 1
        assert "NetworkPolicy shop/allow-web" not in orch.policy_errors
        await orch._on_policy("NetworkPolicy", "DELETED", _knp(generation=3))
        assert repo.policies() == []

    asyncio.run(run())


def test_cnp_and_ccnp_with_status_kept_out_of_the_rules():
    orch, repo = _orchestrator()
    cnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "rule1", "namespace": "default", "generation": 1, "uid": "c"},
           "description": "L3-L4",
           "spec": {"endpointSelector": {"matchLabels": {"org": "empire"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}]}]},
           "status": {"nodes": {"node-b": {"ok": True}}}}
    ccnp = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": "deny-all", "generation": 1, "uid": "d"},
            "spec": {"endpointSelector": {}, "ingress": [{}]}}

    async def run():
        await orch._on_policy("CiliumNetworkPolicy", "ADDED", cnp)
        await orch._on_policy("CiliumClusterwideNetworkPolicy", "ADDED", ccnp)

    asyncio.run(run())
    assert sorted(p.ref for p in repo.policies()) == ["default/rule1", "deny-all"]
    assert orch.status()["policies"] == 2


def test_status_patch_is_cilium_shaped():
    body = node_status("node-a", ok=False, error="spec.x: unknown field")
    entry = body["status"]["nodes"]["node-a"]
    assert entry["ok"] is False and entry["enforcing"] is False
    assert entry["error"] == "spec.x: unknown field"
    ok = node_status("node-a", ok=True, revision=4, warnings=("w1",))["status"]["nodes"]["node-a"]
    assert ok["error"] is None and ok["localPolicyRevision"] == 4
    assert ok["annotations"] == {"pylium.io/warnings": "w1"}


def test_endpoint_labels_from_pod_namespace_and_service_account():
    pod = {"metadata": {"name": "web-1", "namespace": "shop",
                        "labels": {"app": "web", "pod-template-hash": "abc"}},
           "spec": {"serviceAccountName": "web-sa"}}
    ns = {"metadata": {"name": "shop", "labels": {"team": "red",
                                                  "x" * 60: "too-long-once-prefixed"}}}
    assert endpoint_labels(pod, ns) == {
        "app": "web",
        "io.cilium.k8s.namespace.labels.team": "red",
        "io.cilium.k8s.policy.cluster": "default",
        "io.cilium.k8s.policy.serviceaccount": "web-sa",
    }


def test_label_changes_reach_endpoints_and_the_resolver():
    eps = FakeEndpoints([FakeEndpoint(1, "web-1", "shop", {}),
                         FakeEndpoint(2, "other", "shop", {"x": "y"})])
    orch, _ = _orchestrator(eps)
    pod = {"metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
           "spec": {}}
    ns = {"metadata": {"name": "shop", "labels": {"team": "red"}}}

    async def run():
        orch.informers["Namespace"].cache[("", "shop")] = ns
        orch.informers["Pod"].cache[("shop", "web-1")] = pod
        await orch._on_pod("ADDED", pod)
        assert eps.calls == [(1, {"app": "web", "io.cilium.k8s.namespace.labels.team": "red",
                                  "io.cilium.k8s.policy.cluster": "default"})]
        await orch._on_pod("MODIFIED", pod)  # unchanged: no second update
        assert len(eps.calls) == 1
        ns["metadata"]["labels"]["team"] = "blue"
        await orch._on_namespace("MODIFIED", ns)
        assert eps.calls[-1][1]["io.cilium.k8s.namespace.labels.team"] == "blue"
        assert eps.eps[2].labels == {"x": "y"}  # no pod of that name: left alone
        assert (await orch.endpoint_labels("shop", "web-1"))["app"] == "web"

    asyncio.run(run())


def test_conflist_names_the_plugin_and_socket():
    conf = conflist("/run/x.sock")
    assert conf["plugins"] == [{"type": "pylium-cni", "socket": "/run/x.sock"}]
    assert conf["cniVersion"] == "1.0.0"


def test_start_without_credentials_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    orch, _ = _orchestrator()
    with pytest.raises(PluginError, match="kubeconfig"):
        asyncio.run(orch.start())
    orch.options["kubeconfig"] = str(tmp_path / "missing")
    with pytest.raises(PluginError, match="does not exist"):
        asyncio.run(orch.start())
