"""Conformance suite for `pylium.api.KVStore` backends (third-party ones too).

Subclass `KVStoreConformance` in a pytest module and provide a `store_factory` fixture: a
callable that returns a new, *unopened* store on the same backing data every time it is
called (the suite opens several at once to race them, and reopens one to check
persistence)::

    from pylium.kvstore.conformance import KVStoreConformance

    class TestMyStore(KVStoreConformance):
        @pytest.fixture
        def store_factory(self, tmp_path):
            return lambda: MyStore({"url": ...}, tmp_path)

Every test works under a unique key prefix, so one server can be shared by all tests.
Tests are plain synchronous pytest tests that drive asyncio themselves (no pytest plugin
needed). Class attributes describe what the backend can promise:

- `persistent`: data and revision survive closing and reopening the store.
- `watch_history`: a watch replays every individual change after a past revision (etcd,
  embedded). Backends without history (Consul) replay the *current* state of keys changed
  since then and may coalesce changes made between two polls; for them the suite checks that
  a watcher converges on the store's contents instead.
- `lease_ttl`: the TTL used in lease tests (short, to keep the suite fast).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import pytest

from pylium.api.kvstore import KVEvent, KVStore, LeaseNotFound

StoreFactory = Callable[[], KVStore]


def run(coro: Awaitable, timeout: float = 60.0):
    """Run one test coroutine on a fresh event loop, failing after `timeout` seconds."""
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


async def next_events(watch: AsyncIterator[KVEvent], count: int,
                      timeout: float = 10.0) -> list[KVEvent]:
    """The next `count` events from `watch`; fails the test if they do not come in time."""
    events: list[KVEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.01)):
                events.append(await anext(watch))
        except TimeoutError:
            pytest.fail(f"watch delivered {len(events)} of {count} events in {timeout}s: "
                        f"{events}")
    return events


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float,
                     what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout}s: {what}")
        await asyncio.sleep(interval)


class KVStoreConformance:
    persistent: bool = True
    watch_history: bool = True
    lease_ttl: float = 1.0
    #: how long after its TTL a lease may take to be reaped
    lease_grace: float = 5.0
    #: stores opened concurrently in race tests
    racers: int = 4

    @pytest.fixture
    def store_factory(self) -> StoreFactory:  # pragma: no cover - overridden
        raise NotImplementedError("a conformance test class must define `store_factory`")

    @pytest.fixture
    def ns(self) -> str:
        """A key prefix no other test uses."""
        return f"conformance/{uuid.uuid4().hex[:12]}/"

    # helpers -----------------------------------------------------------------------------
    @staticmethod
    async def _open(stack: AsyncExitStack, factory: StoreFactory) -> KVStore:
        return await stack.enter_async_context(factory())

    # CRUD --------------------------------------------------------------------------------
    def test_put_get_delete(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                assert await kv.get(ns + "missing") is None
                rev1 = await kv.put(ns + "k", b"v1")
                item = await kv.get(ns + "k")
                assert (item.key, item.value) == (ns + "k", b"v1")
                assert item.mod_revision == item.create_revision == rev1
                assert item.lease == 0
                rev2 = await kv.put(ns + "k", b"\x00\xffbinary")
                assert rev2 > rev1
                item = await kv.get(ns + "k")
                assert item.value == b"\x00\xffbinary"
                assert (item.create_revision, item.mod_revision) == (rev1, rev2)
                assert await kv.delete(ns + "k") is True
                assert await kv.get(ns + "k") is None
                assert await kv.delete(ns + "k") is False
                # a recreated key starts a new life
                rev3 = await kv.put(ns + "k", b"again")
                item = await kv.get(ns + "k")
                assert item.create_revision == rev3 > rev2
        run(body())

    def test_revision_counts_changes_only(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                start = await kv.revision()
                rev = await kv.put(ns + "a", b"1")
                assert rev > start
                assert await kv.revision() == rev
                assert await kv.create(ns + "a", b"2") is False
                assert await kv.compare_and_swap(ns + "a", rev + 1000, b"3") is False
                assert await kv.delete(ns + "nothing-here") is False
                assert await kv.revision() == rev, "failed writes must not bump the revision"
                assert await kv.delete(ns + "a") is True
                assert await kv.revision() > rev
        run(body())

    def test_list_is_sorted_and_prefix_exact(self, store_factory, ns):
        keys = ["a/b2", "a/", "a/b", "a/b/c", "a/é", "a/Z", "a/0", "ab", "a", "b/a"]

        async def body():
            async with store_factory() as kv:
                assert await kv.list(ns) == []
                for key in keys:
                    await kv.put(ns + key, key.encode())
                under_a = await kv.list(ns + "a/")
                expected = sorted((ns + k for k in keys if k.startswith("a/")),
                                  key=lambda k: k.encode())
                assert [i.key for i in under_a] == expected
                assert all(i.value == i.key[len(ns):].encode() for i in under_a)
                everything = await kv.list(ns)
                assert [i.key for i in everything] == sorted(
                    (ns + k for k in keys), key=lambda k: k.encode())
                assert await kv.list(ns + "zzz") == []
        run(body())

    def test_delete_prefix(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                for key in ("x/1", "x/2", "x/3/4", "xy", "y"):
                    await kv.put(ns + key, b"v")
                assert await kv.delete_prefix(ns + "x/") == 3
                assert [i.key for i in await kv.list(ns)] == [ns + "xy", ns + "y"]
                assert await kv.delete_prefix(ns + "x/") == 0
        run(body())

    # conditional writes -------------------------------------------------------------------
    def test_create_if_absent(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                assert await kv.create(ns + "id", b"first") is True
                assert await kv.create(ns + "id", b"second") is False
                assert (await kv.get(ns + "id")).value == b"first"
        run(body())

    def test_compare_and_swap_and_delete(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                key = ns + "cas"
                assert await kv.compare_and_swap(key, 0, b"v1") is True  # 0: must not exist
                assert await kv.compare_and_swap(key, 0, b"no") is False
                item = await kv.get(key)
                assert await kv.compare_and_swap(key, item.mod_revision + 1, b"no") is False
                assert await kv.compare_and_swap(key, item.mod_revision, b"v2") is True
                newer = await kv.get(key)
                assert newer.value == b"v2" and newer.mod_revision > item.mod_revision
                assert newer.create_revision == item.create_revision
                assert await kv.compare_and_delete(key, item.mod_revision) is False
                assert (await kv.get(key)).value == b"v2"
                assert await kv.compare_and_delete(key, newer.mod_revision) is True
                assert await kv.get(key) is None
                assert await kv.compare_and_delete(key, newer.mod_revision) is False
        run(body())

    def test_concurrent_cas_has_one_winner_per_round(self, store_factory, ns):
        rounds, per_store = 8, 3

        async def body():
            async with AsyncExitStack() as stack:
                stores = [await self._open(stack, store_factory) for _ in range(self.racers)]
                key = ns + "counter"
                await stores[0].put(key, b"0")
                for round_no in range(rounds):
                    expected = (await stores[0].get(key)).mod_revision
                    attempts = [(s, f"{round_no}:{i}:{j}".encode())
                                for i, s in enumerate(stores) for j in range(per_store)]
                    results = await asyncio.gather(*(
                        s.compare_and_swap(key, expected, value) for s, value in attempts))
                    winners = [value for (_, value), ok in zip(attempts, results, strict=True)
                               if ok]
                    assert len(winners) == 1, f"round {round_no}: winners {winners}"
                    assert (await stores[-1].get(key)).value == winners[0]
        run(body())

    def test_concurrent_create_has_one_winner(self, store_factory, ns):
        async def body():
            async with AsyncExitStack() as stack:
                stores = [await self._open(stack, store_factory) for _ in range(self.racers)]
                for n in range(5):
                    key = f"{ns}identity/{n}"
                    results = await asyncio.gather(*(
                        s.create(key, f"{i}".encode()) for i, s in enumerate(stores * 3)))
                    assert sum(results) == 1, results
                    winner = results.index(True)
                    assert (await stores[0].get(key)).value == f"{winner}".encode()
        run(body())

    # watches ------------------------------------------------------------------------------
    def test_watch_replays_history_in_order_and_resumes(self, store_factory, ns):
        if not self.watch_history:
            pytest.skip("backend keeps no change history (see watch_history)")

        async def body():
            async with store_factory() as kv:
                start = await kv.revision()
                await kv.put(ns + "w/a", b"1")
                await kv.put(ns + "w/b", b"2")
                await kv.put(ns + "other", b"not watched")
                await kv.delete(ns + "w/a")
                await kv.put(ns + "w/b", b"3")
                watch = kv.watch(ns + "w/", after_revision=start)
                events = await next_events(watch, 4)
                await watch.aclose()
                assert [(e.type, e.key, e.value) for e in events] == [
                    ("put", ns + "w/a", b"1"), ("put", ns + "w/b", b"2"),
                    ("delete", ns + "w/a", b""), ("put", ns + "w/b", b"3")]
                revisions = [e.revision for e in events]
                assert revisions == sorted(set(revisions)) and revisions[0] > start
                # resume after the second event: only the later two come back
                watch = kv.watch(ns + "w/", after_revision=revisions[1])
                resumed = await next_events(watch, 2)
                assert resumed == events[2:]
                # ...and then live changes follow, in order
                await kv.put(ns + "w/c", b"4")
                await kv.delete_prefix(ns + "w/")
                live = await next_events(watch, 3)
                await watch.aclose()
                assert [(e.type, e.key) for e in live] == [
                    ("put", ns + "w/c"), ("delete", ns + "w/b"), ("delete", ns + "w/c")]
                assert live[1].revision == live[2].revision > live[0].revision
        run(body())

    def test_watch_from_now_skips_the_past(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                await kv.put(ns + "n/old", b"old")
                watch = kv.watch(ns + "n/")
                first = asyncio.ensure_future(anext(watch))
                await asyncio.sleep(0.5)  # let the watch establish itself
                rev = await kv.put(ns + "n/new", b"new")
                async with asyncio.timeout(10):
                    event = await first
                await watch.aclose()
                assert (event.type, event.key, event.value) == ("put", ns + "n/new", b"new")
                assert event.revision == rev
        run(body())

    def test_watch_filters_by_prefix(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                start = await kv.revision()
                watch = kv.watch(ns + "p/", after_revision=start)
                for key in ("q/1", "p", "p/1", "pp/1", "p/2"):
                    await kv.put(ns + key, b"v")
                events = await next_events(watch, 2)
                await watch.aclose()
                assert [e.key for e in events] == [ns + "p/1", ns + "p/2"]
        run(body())

    def test_watcher_converges_on_store_contents(self, store_factory, ns):
        """Whatever a backend coalesces, a watcher that applies events ends up with what
        `list()` returns (the pattern every cluster-state cache uses)."""
        async def body():
            async with store_factory() as writer, store_factory() as reader:
                await writer.put(ns + "c/keep", b"0")
                rev = await reader.revision()
                cache = {i.key: i.value for i in await reader.list(ns + "c/")}
                watch = reader.watch(ns + "c/", after_revision=rev)

                async def follow():
                    async for event in watch:
                        if event.type == "put":
                            cache[event.key] = event.value
                        else:
                            cache.pop(event.key, None)

                follower = asyncio.ensure_future(follow())
                for i in range(30):
                    await writer.put(f"{ns}c/{i % 7}", f"{i}".encode())
                    if i % 5 == 4:
                        await writer.delete(f"{ns}c/{(i + 3) % 7}")
                await writer.delete_prefix(ns + "c/3")
                expected = {i.key: i.value for i in await writer.list(ns + "c/")}

                async def converged():
                    return cache == expected
                try:
                    await eventually(converged, 10, f"watch cache {cache} == {expected}")
                finally:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
                    await watch.aclose()
        run(body())

    def test_watch_sees_changes_from_another_client(self, store_factory, ns):
        async def body():
            async with store_factory() as writer, store_factory() as reader:
                start = await reader.revision()
                watch = reader.watch(ns + "x/", after_revision=start)
                await writer.put(ns + "x/1", b"from writer")
                (event,) = await next_events(watch, 1)
                await watch.aclose()
                assert (event.type, event.key, event.value) == ("put", ns + "x/1",
                                                                b"from writer")
        run(body())

    # leases -------------------------------------------------------------------------------
    def test_lease_expiry_deletes_keys_and_notifies(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                granted = time.monotonic()
                lease = await kv.grant_lease(self.lease_ttl)
                assert lease.ttl >= self.lease_ttl
                start = await kv.revision()
                await kv.put(ns + "l/leased", b"v", lease=lease)
                assert await kv.create(ns + "l/created", b"v", lease=lease) is True
                await kv.put(ns + "l/plain", b"v")
                assert (await kv.get(ns + "l/leased")).lease == lease.id
                watch = kv.watch(ns + "l/", after_revision=start)
                puts = await next_events(watch, 3)
                assert {e.key for e in puts} == {ns + "l/leased", ns + "l/created",
                                                 ns + "l/plain"}
                deletes = await next_events(watch, 2, timeout=lease.ttl + self.lease_grace)
                await watch.aclose()
                assert time.monotonic() - granted >= lease.ttl * 0.9, "expired before its TTL"
                assert {(e.type, e.key) for e in deletes} == {
                    ("delete", ns + "l/leased"), ("delete", ns + "l/created")}
                assert [i.key for i in await kv.list(ns + "l/")] == [ns + "l/plain"]
                assert await kv.keepalive(lease) is False
                with pytest.raises(LeaseNotFound):
                    await kv.put(ns + "l/late", b"v", lease=lease)
                assert await kv.get(ns + "l/late") is None
        run(body(), timeout=60 + self.lease_ttl * 3)

    def test_keepalive_keeps_keys(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                lease = await kv.grant_lease(self.lease_ttl)
                await kv.put(ns + "k/alive", b"v", lease=lease)
                deadline = time.monotonic() + lease.ttl * 2.5
                while time.monotonic() < deadline:
                    assert await kv.keepalive(lease) is True
                    await asyncio.sleep(lease.ttl / 4)
                assert await kv.get(ns + "k/alive") is not None, "kept-alive key vanished"

                async def gone():
                    return await kv.get(ns + "k/alive") is None
                await eventually(gone, lease.ttl + self.lease_grace,
                                 "key removed once keepalives stop")
        run(body(), timeout=60 + self.lease_ttl * 6)

    def test_revoke_lease_deletes_its_keys_now(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                lease = await kv.grant_lease(max(self.lease_ttl, 30))
                other = await kv.grant_lease(max(self.lease_ttl, 30))
                await kv.put(ns + "r/1", b"v", lease=lease)
                await kv.put(ns + "r/2", b"v", lease=lease)
                await kv.put(ns + "r/other", b"v", lease=other)
                await kv.put(ns + "r/plain", b"v")
                await kv.revoke_lease(lease)
                assert [i.key for i in await kv.list(ns + "r/")] == [ns + "r/other",
                                                                    ns + "r/plain"]
                assert await kv.keepalive(lease) is False
                await kv.revoke_lease(other)
                assert [i.key for i in await kv.list(ns + "r/")] == [ns + "r/plain"]
        run(body())

    def test_put_many_writes_every_key_on_the_lease_and_watchers_see_each(self, store_factory,
                                                                          ns):
        """More keys than one etcd transaction takes (128), on a lease: all written, all
        announced to a watcher once, all gone with the lease."""
        async def body():
            async with store_factory() as kv:
                lease = await kv.grant_lease(max(self.lease_ttl, 30))
                start = await kv.revision()
                watch = kv.watch(ns + "m/", after_revision=start)
                items = [(f"{ns}m/{i:03d}", f"v{i}".encode()) for i in range(300)]
                revision = await kv.put_many(items, lease=lease)
                assert revision == await kv.revision()
                assert [(i.key, i.value) for i in await kv.list(ns + "m/")] == items
                events = await next_events(watch, 300)
                await watch.aclose()
                assert sorted((e.key, e.value) for e in events) == items
                assert all(e.type == "put" for e in events)
                assert await kv.put_many([], lease=lease) == 0
                await kv.revoke_lease(lease)
                assert await kv.list(ns + "m/") == []
        run(body())

    def test_delete_many_deletes_every_key_given_and_watchers_see_each(self, store_factory,
                                                                       ns):
        """Keys that exist go (counted), missing ones are no error, others stay; a watcher
        (of a backend that keeps history) gets one delete event per key that existed."""
        async def body():
            async with store_factory() as kv:
                await kv.put_many([(f"{ns}d/{i:03d}", b"x") for i in range(600)])
                await kv.put(ns + "keep", b"y")
                start = await kv.revision()
                gone = [f"{ns}d/{i:03d}" for i in range(600)] + [ns + "d/missing"]
                assert await kv.delete_many(gone) == 600
                if self.watch_history:
                    watch = kv.watch(ns + "d/", after_revision=start)
                    events = await next_events(watch, 600)
                    await watch.aclose()
                    assert sorted(e.key for e in events) == sorted(gone[:-1])
                    assert all(e.type == "delete" for e in events)
                assert await kv.list(ns + "d/") == []
                assert (await kv.get(ns + "keep")).value == b"y"
                assert await kv.delete_many([]) == 0
        run(body())

    def test_watch_batches_deliver_the_same_events_as_watch(self, store_factory, ns):
        """`watch_batches` yields non-empty lists holding exactly `watch`'s events in order
        (history, a multi-key transaction, a prefix delete), and resumes the same way."""
        if not self.watch_history:
            pytest.skip("backend keeps no change history (see watch_history)")

        async def body():
            async with store_factory() as kv:
                start = await kv.revision()
                await kv.put(ns + "b/a", b"1")
                await kv.put_many([(f"{ns}b/m{i}", b"x") for i in range(5)])
                await kv.put(ns + "other", b"not watched")
                await kv.delete_prefix(ns + "b/m")
                await kv.put(ns + "b/a", b"2")
                watch = kv.watch(ns + "b/", after_revision=start)
                expected = await next_events(watch, 12)
                await watch.aclose()
                batches = kv.watch_batches(ns + "b/", after_revision=start)
                got: list[KVEvent] = []
                while len(got) < 12:
                    async with asyncio.timeout(10):
                        batch = await anext(batches)
                    assert isinstance(batch, list) and batch
                    got += batch
                assert got == expected
                # live changes follow; resuming after an event gives only later ones
                await kv.put(ns + "b/c", b"3")
                async with asyncio.timeout(10):
                    live = await anext(batches)
                await batches.aclose()
                assert [(e.type, e.key, e.value) for e in live] == [("put", ns + "b/c", b"3")]
                batches = kv.watch_batches(ns + "b/", after_revision=expected[-2].revision)
                async with asyncio.timeout(10):
                    resumed = await anext(batches)
                await batches.aclose()
                assert resumed[0] == expected[-1]
        run(body())

    # persistence and health -------------------------------------------------------------
    def test_persists_across_reopen(self, store_factory, ns):
        if not self.persistent:
            pytest.skip("backend is not persistent")

        async def body():
            async with store_factory() as kv:
                rev = await kv.put(ns + "durable", b"still here")
                await kv.put(ns + "durable2", b"too")
            async with store_factory() as kv:
                item = await kv.get(ns + "durable")
                assert item is not None and item.value == b"still here"
                assert item.mod_revision == rev
                assert await kv.revision() >= rev + 1
                assert [i.key for i in await kv.list(ns)] == [ns + "durable", ns + "durable2"]
        run(body())

    def test_status(self, store_factory, ns):
        async def body():
            async with store_factory() as kv:
                rev = await kv.put(ns + "s", b"v")
                status = await kv.status()
                assert status["backend"] == kv.name
                assert status["healthy"] is True
                assert isinstance(status["revision"], int) and status["revision"] >= rev
                assert isinstance(status["detail"], str)
        run(body())
