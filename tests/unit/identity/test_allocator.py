"""The identity allocator on the real embedded KV store (SQLite), with two "nodes" opening
the same database file as separate stores, allocating at the same time."""

from __future__ import annotations

import asyncio

import pytest
from pylium.identity.allocator import ID_PREFIX, VALUE_PREFIX, IdentityAllocator, _value_key
from pylium.identity.labels import LabelSet
from pylium.identity.manager import IdentityManager
from pylium.identity.model import IDENTITY_HOST, MIN_ALLOCATED
from pylium.kvstore.embedded import EmbeddedKVStore


async def _stores(tmp_path, n=2):
    stores = []
    for _ in range(n):
        store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        stores.append(store)
    return stores


def run(coro):
    return asyncio.run(coro)


def test_same_labels_get_one_number_and_numbers_start_at_256(tmp_path):
    async def go():
        a, b = await _stores(tmp_path)
        try:
            node_a = IdentityAllocator(a, "node-a")
            node_b = IdentityAllocator(b, "node-b")
            labels = LabelSet.parse("app=web,k8s:io.kubernetes.pod.namespace=default")
            first = await node_a.allocate(labels)
            second = await node_b.allocate(labels)
            assert first.id == second.id == MIN_ALLOCATED
            assert sorted(await node_a.references(first.id)) == ["node-a", "node-b"]
            other = await node_b.allocate(LabelSet.parse("app=db"))
            assert other.id == MIN_ALLOCATED + 1
            assert (await node_a.get(other.id)).labels == LabelSet.parse("app=db")
        finally:
            await a.close()
            await b.close()
    run(go())


def test_concurrent_allocation_never_splits_or_shares_a_number(tmp_path):
    label_sets = [LabelSet.parse(f"app=a{i % 7},tier=t{i % 3}") for i in range(40)]

    async def go():
        a, b = await _stores(tmp_path)
        try:
            node_a = IdentityAllocator(a, "node-a")
            node_b = IdentityAllocator(b, "node-b")
            results = await asyncio.gather(
                *[node_a.allocate(ls) for ls in label_sets],
                *[node_b.allocate(ls) for ls in reversed(label_sets)])
            by_labels: dict = {}
            by_number: dict = {}
            for identity in results:
                by_labels.setdefault(identity.labels, set()).add(identity.id)
                by_number.setdefault(identity.id, set()).add(identity.labels)
            assert all(len(v) == 1 for v in by_labels.values()), by_labels
            assert all(len(v) == 1 for v in by_number.values()), by_number
            assert len(by_labels) == len(set(label_sets))
            # the store agrees with what callers were told, with no orphan numbers
            stored = {i.id: i.labels for i in await node_a.list()}
            assert stored == {next(iter(v)): k for k, v in by_labels.items()}
            assert len(await a.list(VALUE_PREFIX)) == len(stored)
        finally:
            await a.close()
            await b.close()
    run(go())


def test_release_and_garbage_collection(tmp_path):
    async def go():
        (a,) = await _stores(tmp_path, 1)
        try:
            node = IdentityAllocator(a, "node-a")
            kept = await node.allocate(LabelSet.parse("app=kept"))
            dropped = await node.allocate(LabelSet.parse("app=dropped"))
            await node.release(dropped)
            assert await node.collect_garbage() == [dropped.id]
            assert await a.get(f"{ID_PREFIX}{dropped.id}") is None
            assert await node.get(kept.id) is not None
            again = await node.allocate(LabelSet.parse("app=dropped"))
            assert again.labels == dropped.labels
        finally:
            await a.close()
    run(go())


def test_references_expire_with_the_node_lease(tmp_path):
    async def go():
        (a,) = await _stores(tmp_path, 1)
        try:
            lease = await a.grant_lease(60)
            node = IdentityAllocator(a, "node-a", lease)
            identity = await node.allocate(LabelSet.parse("app=web"))
            assert await node.references(identity.id) == ["node-a"]
            await a.revoke_lease(lease)
            assert await node.references(identity.id) == []
            assert await node.collect_garbage() == [identity.id]
        finally:
            await a.close()
    run(go())


def test_reserved_label_sets_keep_reserved_numbers(tmp_path):
    async def go():
        (a,) = await _stores(tmp_path, 1)
        try:
            node = IdentityAllocator(a, "node-a")
            host = await node.allocate(LabelSet.parse("reserved:host"))
            assert host.id == IDENTITY_HOST
            assert await a.list(ID_PREFIX) == []
        finally:
            await a.close()
    run(go())


def test_manager_follows_other_nodes_through_the_watch(tmp_path):
    async def go():
        a, b = await _stores(tmp_path)
        watcher = IdentityManager(a, "node-a")
        try:
            revision = await watcher.sync()
            watcher.start_watch(revision)
            seen = asyncio.Event()
            watcher.cache.subscribe(lambda added, removed: seen.set() if added else None)
            other = IdentityManager(b, "node-b")
            identity = await other.allocate(LabelSet.parse("app=remote"))
            await asyncio.wait_for(seen.wait(), timeout=20)
            assert watcher.lookup(identity.id).labels == LabelSet.parse("app=remote")
        finally:
            await watcher.close()
            await a.close()
            await b.close()
    run(go())


@pytest.mark.parametrize("text", ["app=web,tier=db", ["k8s:app=web", "k8s:tier=db"]])
def test_label_parsing_defaults_to_the_k8s_source(text):
    labels = LabelSet.parse(text)
    assert labels.sorted_strings() == ["k8s:app=web", "k8s:tier=db"]


def test_manager_keeps_the_reference_until_the_last_local_user_releases(tmp_path):
    async def go():
        (a,) = await _stores(tmp_path, 1)
        try:
            manager = IdentityManager(a, "node-a")
            labels = LabelSet.parse("app=web")
            one = await manager.allocate(labels)
            two = await manager.allocate(labels)
            assert one == two and manager.referenced() == [one]
            await manager.release(one)
            assert await manager.allocator.references(one.id) == ["node-a"]
            await manager.release(two)
            assert await manager.allocator.references(one.id) == []
        finally:
            await a.close()
    run(go())


def test_a_stale_index_does_not_take_away_the_reference_of_a_number_in_use(tmp_path):
    """A node holds number N for one label set; another label set's index still names N
    (its old number, collected and reused). Allocating that label set must not delete the
    node's one reference key for N, or garbage collection would take N while it is in use."""
    async def go():
        (store,) = await _stores(tmp_path, n=1)
        try:
            node = IdentityAllocator(store, "node-a")
            old = LabelSet.parse("app=old")
            held = LabelSet.parse("app=held")
            first = await node.allocate(old)
            await node.release(first)
            assert first.id in await node.collect_garbage()
            reused = await node.allocate(held)
            assert reused.id == first.id
            # the old label set's index entry, as a node that missed the collection left it
            await store.put(_value_key(old), str(first.id).encode())
            fresh = await node.allocate(old)
            assert fresh.id != reused.id
            assert await node.references(reused.id) == ["node-a"]
            assert reused.id not in await node.collect_garbage()
            assert (await node.get(reused.id)).labels == held
        finally:
            await store.close()
    run(go())


@pytest.mark.parametrize("hostile", [b"", b"not a number", b"-1", b"12", b"99999999999",
                                     "\u0663\u0664".encode(), b"\xff\xfe"])
def test_an_unreadable_index_entry_is_replaced_never_raised_on(tmp_path, hostile):
    """A `value/` entry a peer (or a corruption) left naming no allocated number: lookups say
    "none", allocation replaces it with a real number, garbage collection does not trip."""
    async def go():
        [store] = await _stores(tmp_path, 1)
        try:
            allocator = IdentityAllocator(store, "node-a")
            labels = LabelSet.parse("app=hostile")
            assert await store.create(_value_key(labels), hostile)
            assert await allocator.lookup(labels) is None
            got = await allocator.allocate(labels)
            assert got.id >= MIN_ALLOCATED
            assert (await allocator.lookup(labels)).id == got.id
            await allocator.release(got)
            assert got.id in await allocator.collect_garbage()
            assert await allocator.lookup(labels) is None
        finally:
            await store.close()
    run(go())


def test_a_label_set_the_node_already_holds_needs_no_store(tmp_path):
    """A second endpoint with labels this node already references gets the identity from
    the node's own count (no store round trip): it works while the KV store is down; a
    new label set then fails clearly; the count goes back down on release."""
    from pylium.api.kvstore import KVStoreUnavailable

    async def go():
        (store,) = await _stores(tmp_path, 1)
        manager = IdentityManager(store, "node1", await store.grant_lease(30))
        web = await manager.allocate(LabelSet.parse("app=web"))
        await store.close()  # the store is gone
        assert await manager.allocate(LabelSet.parse("app=web")) == web
        assert manager.references() == {web.id: 2}
        with pytest.raises(KVStoreUnavailable):
            await manager.allocate(LabelSet.parse("app=new"))
        await manager.release(web)
        assert manager.references() == {web.id: 1}
    run(go())


def test_allocating_a_held_label_set_again_reads_the_index_and_writes_nothing(tmp_path):
    """A node that already references and fenced a number for these labels only checks the
    index (one read): no second reference write, no fence; the identity is unchanged, and a
    held number the index names for *other* labels still takes the full path (covered by
    the stale-index test above)."""
    async def go():
        (store,) = await _stores(tmp_path, 1)
        try:
            node = IdentityAllocator(store, "node-a")
            labels = LabelSet.parse("app=web")
            first = await node.allocate(labels)
            calls = []
            for name in ("get", "put", "create", "compare_and_swap", "list", "delete"):
                original = getattr(store, name)

                def counted(*args, _name=name, _original=original, **kwargs):
                    calls.append(_name)
                    return _original(*args, **kwargs)
                setattr(store, name, counted)
            again = await node.allocate(labels)
            assert again == first
            assert calls == ["get"]
            # released, the next allocation references and fences again
            await node.release(first)
            calls.clear()
            assert await node.allocate(labels) == first
            assert "put" in calls and "compare_and_swap" in calls
            assert await node.references(first.id) == ["node-a"]
        finally:
            await store.close()
    run(go())


def test_concurrent_allocations_of_one_label_set_share_one_store_allocation(tmp_path):
    """The pods of one workload starting on a node at once: one allocation in the store for
    all of them (not twenty racing each other's fence writes), every one of them counted
    as a local user; a failing allocation fails its waiters with the same error."""
    from pylium.api.kvstore import KVStoreUnavailable

    async def go():
        (store,) = await _stores(tmp_path, 1)
        try:
            manager = IdentityManager(store, "node-a")
            calls = []
            original = manager.allocator.allocate

            async def counted(labels):
                calls.append(labels)
                await asyncio.sleep(0.05)  # still under way when the others ask
                return await original(labels)
            manager.allocator.allocate = counted
            labels = LabelSet.parse("app=web")
            got = await asyncio.gather(*(manager.allocate(labels) for _ in range(20)))
            assert len(calls) == 1 and len(set(got)) == 1
            assert manager.references() == {got[0].id: 20}
            for identity in got:
                await manager.release(identity)
            assert manager.references() == {}
            assert await manager.allocator.references(got[0].id) == []

            async def down(labels):
                calls.append(labels)
                await asyncio.sleep(0.05)
                raise KVStoreUnavailable("the store is down")
            manager.allocator.allocate = down
            calls.clear()
            failed = await asyncio.gather(*(manager.allocate(LabelSet.parse("app=db"))
                                            for _ in range(5)), return_exceptions=True)
            assert len(calls) == 1
            assert all(isinstance(e, KVStoreUnavailable) for e in failed)
            assert manager.references() == {}
        finally:
            await store.close()
    run(go())
