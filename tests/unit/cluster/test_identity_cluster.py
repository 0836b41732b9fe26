"""Cluster-wide identity allocation: two and three "nodes" (each with its own connection to
one store) allocating overlapping label sets at the same time, with garbage collectors
running on every node meanwhile — on the embedded store, a real etcd and the Consul
emulator (no Consul agent can run here)."""

from __future__ import annotations

import asyncio
import random

import pytest
from pylium.cluster.component import IdentityCollector
from pylium.identity.allocator import ID_PREFIX, REFS_PREFIX, VALUE_PREFIX, IdentityAllocator
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity
from pylium.kvstore.embedded import EmbeddedKVStore
from pylium_kvstore_consul.backend import ConsulKVStore
from pylium_kvstore_etcd.backend import EtcdKVStore

from tests.support.consul_emulator import ConsulEmulator

pytestmark = pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def consul_emulator():
    with ConsulEmulator(min_ttl=1) as server:
        yield server


@pytest.fixture(params=["embedded", "etcd", "consul"])
def open_store(request, tmp_path):
    if request.param == "embedded":
        def make():
            return EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
    elif request.param == "etcd":
        server = request.getfixturevalue("etcd_server")

        def make():
            return EtcdKVStore({"endpoints": [server.endpoint]}, tmp_path)
    else:
        emulator = request.getfixturevalue("consul_emulator")

        def make():
            return ConsulKVStore({"address": emulator.address, "min_session_ttl": 1,
                                  "wait": 2}, tmp_path)

    async def opened():
        store = make()
        await store.open()
        # every run starts from an empty identity space (module-scoped servers)
        await store.delete_prefix("pylium/state/identities/")
        return store
    return opened


async def _check_store(store) -> dict[int, LabelSet]:
    """The store's invariants: one label set per number, one number per label set, every
    index entry names an existing number with that label set."""
    from pylium.identity.allocator import decode_labels

    ids = {int(i.key[len(ID_PREFIX):]): decode_labels(i.value)
           for i in await store.list(ID_PREFIX)}
    assert len(set(ids.values())) == len(ids), "a label set has two numbers"
    for item in await store.list(VALUE_PREFIX):
        number = int(item.value)
        assert number in ids, f"index {item.key} names missing number {number}"
    return ids


@pytest.mark.parametrize("nodes", [2, 3])
def test_200_concurrent_allocations_give_each_label_set_exactly_one_identity(open_store,
                                                                             nodes):
    async def go():
        stores = [await open_store() for _ in range(nodes)]
        try:
            leases = [await s.grant_lease(30) for s in stores]
            allocators = [IdentityAllocator(s, f"node{i}", lease)
                          for i, (s, lease) in enumerate(zip(stores, leases, strict=True))]
            sets = [LabelSet.parse(f"app=svc{i % 25},tier=t{i % 2}") for i in range(50)]
            rng = random.Random(nodes)
            jobs = [(allocators[i % nodes], rng.choice(sets)) for i in range(200)]
            results = await asyncio.gather(*(a.allocate(labels) for a, labels in jobs))
            by_labels: dict[LabelSet, set[int]] = {}
            for identity in results:
                by_labels.setdefault(identity.labels, set()).add(identity.id)
            assert all(len(n) == 1 for n in by_labels.values()), by_labels
            numbers = [next(iter(n)) for n in by_labels.values()]
            assert len(numbers) == len(set(numbers))
            ids = await _check_store(stores[0])
            for labels, found in by_labels.items():
                assert ids[next(iter(found))] == labels
            # no identity left behind by lost races: exactly the label sets asked for
            assert len(ids) == len(by_labels)
        finally:
            for s in stores:
                await s.close()
    asyncio.run(go())


def test_garbage_collection_racing_allocations_never_loses_an_identity_in_use(open_store):
    """Three nodes allocate and release while all three run the collector in a loop: an
    identity some node holds is never deleted, and the store stays consistent."""
    async def go():
        stores = [await open_store() for _ in range(3)]
        try:
            allocators = [IdentityAllocator(s, f"node{i}", await s.grant_lease(30))
                          for i, s in enumerate(stores)]
            sets = [LabelSet.parse(f"app=churn{i}") for i in range(12)]
            held: list[dict[LabelSet, Identity]] = [{} for _ in allocators]
            stop = asyncio.Event()

            async def churn(index: int) -> None:
                rng = random.Random(index)
                for _ in range(40):
                    labels = rng.choice(sets)
                    mine = held[index]
                    if labels in mine and rng.random() < 0.5:
                        await allocators[index].release(mine.pop(labels))
                    elif labels not in mine:
                        mine[labels] = await allocators[index].allocate(labels)

            async def collect(index: int) -> None:
                collector = IdentityCollector(allocators[index])
                while not stop.is_set():
                    await collector.run_once()
                    await asyncio.sleep(0)

            async def keep_leases_alive() -> None:
                # as agents do: a slow run (a loaded CI machine) must not outlive the leases
                while not stop.is_set():
                    for allocator, store in zip(allocators, stores, strict=True):
                        await store.keepalive(allocator.lease)
                    await asyncio.sleep(1)

            collectors = [asyncio.create_task(collect(i)) for i in range(3)]
            keeper = asyncio.create_task(keep_leases_alive())
            await asyncio.gather(*(churn(i) for i in range(3)))
            stop.set()
            await asyncio.gather(*collectors, keeper)
            ids = await _check_store(stores[0])
            for mine in held:
                for labels, identity in mine.items():
                    assert ids.get(identity.id) == labels, \
                        f"identity {identity.id} of {labels!r} in use but gone"
            # what nobody holds any more goes after two collector passes
            for index, mine in enumerate(held):
                for identity in mine.values():
                    await allocators[index].release(identity)
            collector = IdentityCollector(allocators[0])
            await collector.run_once()
            await collector.run_once()
            assert await stores[0].list(ID_PREFIX) == []
            assert await stores[0].list(VALUE_PREFIX) == []
            assert await stores[0].list(REFS_PREFIX) == []
        finally:
            for s in stores:
                await s.close()
    asyncio.run(go())


def test_restore_puts_back_an_identity_collected_while_its_node_was_away(open_store):
    async def go():
        a_store, b_store = await open_store(), await open_store()
        try:
            a = IdentityAllocator(a_store, "a", await a_store.grant_lease(30))
            lease_b = await b_store.grant_lease(30)
            b = IdentityAllocator(b_store, "b", lease_b)
            web = await b.allocate(LabelSet.parse("app=web"))
            # b's lease ends (an outage longer than its TTL); a collects the number
            await b_store.revoke_lease(lease_b)
            collector = IdentityCollector(a)
            await collector.run_once()
            assert await collector.run_once() == [web.id]
            b.lease = await b_store.grant_lease(30)
            assert await b.restore(web) == web      # same number, keys back
            assert await a.lookup(LabelSet.parse("app=web")) == web
            assert await a.references(web.id) == ["b"]
            # if the label set got another number meanwhile, restore says which
            await b.release(web)
            await collector.run_once()
            assert await collector.run_once() == [web.id]
            other = await a.allocate(LabelSet.parse("app=db"))
            newer = await a.allocate(LabelSet.parse("app=web"))
            restored = await b.restore(web)
            assert restored.labels == web.labels
            assert restored.id == (web.id if newer.id == web.id else newer.id)
            assert restored.id != other.id
            await _check_store(a_store)
        finally:
            await a_store.close()
            await b_store.close()
    asyncio.run(go())


def test_after_the_store_lost_its_data_a_new_label_set_never_takes_a_number_in_use(open_store):
    """The store is empty again (wiped) and b has not written its identities back yet: a
    allocates a new label set meanwhile. a's identity cache knows b's numbers (it followed
    them), so it does not claim them, and b gets its numbers back unchanged."""
    async def go():
        a_store, b_store = await open_store(), await open_store()
        try:
            b = IdentityAllocator(b_store, "b", await b_store.grant_lease(30))
            used = [await b.allocate(LabelSet.parse(f"app=b{i}")) for i in range(3)]
            known = {i.id for i in used}
            a = IdentityAllocator(a_store, "a", await a_store.grant_lease(30),
                                  known=lambda: known)
            await a_store.delete_prefix("pylium/state/identities/")  # the wipe
            fresh = await a.allocate(LabelSet.parse("app=new"))
            assert fresh.id not in known
            for identity in used:
                assert await b.restore(identity) == identity
            ids = await _check_store(a_store)
            assert set(ids) == known | {fresh.id}
            # without the cache, the lowest free number is one b still uses
            blind = IdentityAllocator(a_store, "c", await a_store.grant_lease(30))
            await a_store.delete_prefix("pylium/state/identities/")
            assert (await blind.allocate(LabelSet.parse("app=other"))).id in known
        finally:
            await a_store.close()
            await b_store.close()
    asyncio.run(go())
