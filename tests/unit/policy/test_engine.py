"""The incremental engine and the repository: only affected identities are recomputed and
announced; results equal a from-scratch resolution; policies survive an agent restart."""

from __future__ import annotations

import asyncio

from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity
from pylium.kvstore.embedded import EmbeddedKVStore
from pylium.policy.engine import PolicyEngine
from pylium.policy.load import load_text
from pylium.policy.repository import POLICY_PREFIX, PolicyRepository, PolicyStore
from pylium.policy.resolve import resolve


def ident(number: int, text: str) -> Identity:
    return Identity(number, LabelSet.parse(f"{text},k8s:io.kubernetes.pod.namespace=default"))


def allow_from(name: str, subject: str, peer: str, port: int = 80):
    return load_text(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: {subject}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}]}}]
""")


def setup():
    cache = IdentityCache([ident(256, "app=web"), ident(257, "app=api"), ident(258, "app=db")])
    repo = PolicyRepository()
    engine = PolicyEngine(repo, cache)
    changes = []
    engine.subscribe(changes.append)
    return cache, repo, engine, changes


def test_policy_change_touches_only_selected_identities():
    cache, repo, engine, changes = setup()
    for number in (256, 257, 258):
        engine.endpoint_policy(number)
    repo.add(allow_from("p1", "db", "api"))
    assert changes[-1].identities == {258}
    db = engine.endpoint_policy(258)
    assert db.ingress_enforced and db.revision == repo.revision
    assert db.entries == resolve(repo.policies(), cache.get(258), cache).entries
    web = engine.endpoint_policy(256)
    assert not web.ingress_enforced
    repo.delete("default/p1")
    assert changes[-1].identities == {258}
    assert not engine.endpoint_policy(258).ingress_enforced


def test_new_identity_updates_only_policies_that_select_it():
    cache, repo, engine, changes = setup()
    repo.add(allow_from("p1", "db", "api") + allow_from("p2", "web", "nobody"))
    before = engine.endpoint_policy(258)
    engine.endpoint_policy(256)
    changes.clear()
    second_api = ident(300, "app=api,version=v2")
    cache.add(second_api)
    assert changes[-1].identities == {258}  # web's peers did not change
    after = engine.endpoint_policy(258)
    assert {k.identity for k in after.entries} == {257, 300}
    assert {k.identity for k in before.entries} == {257}
    cache.remove(300)
    assert {k.identity for k in engine.endpoint_policy(258).entries} == {257}


def test_cidr_rules_create_local_cidr_identities():
    cache, repo, engine, _ = setup()
    repo.add(load_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]}]
"""))
    prefixes = {str(i.cidr) for i in cache if i.cidr is not None}
    assert prefixes == {"10.0.0.0/8", "10.96.0.0/12"}
    policy = engine.endpoint_policy(256)
    inside = cache.for_ip("10.0.0.1")
    assert any(k.identity == inside.id and not e.deny for k, e in policy.entries.items())


def test_store_persists_policies_across_restarts(tmp_path):
    async def go():
        store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        try:
            first = PolicyStore(PolicyRepository(), store)
            await first.add(allow_from("p1", "db", "api") + load_text(
                '[{"endpointSelector": {}, "ingress": [{}]}]', "json-rules"))
            assert len(await store.list(POLICY_PREFIX)) == 2
            second = PolicyStore(PolicyRepository(), store)
            assert await second.load() == 2
            assert [p.ref for p in second.repository.policies()] == [
                "default/p1", "json-rules"]
            await second.delete("p1", "default")
            third = PolicyStore(PolicyRepository(), store)
            await third.load()
            assert [p.ref for p in third.repository.policies()] == ["json-rules"]
        finally:
            await store.close()
    asyncio.run(go())
