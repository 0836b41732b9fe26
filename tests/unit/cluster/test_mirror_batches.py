"""`PrefixMirror` applies a watch batch at once: several events of one key in a batch come
out as one change (the last value), and a batch reaches `on_changes` in one call."""

from __future__ import annotations

import asyncio
import contextlib

from pylium.cluster.mirror import PrefixMirror
from pylium.kvstore.embedded import EmbeddedKVStore


class GroupingStore(EmbeddedKVStore):
    """The embedded store, whose watch batches hold exactly `group` events each (what an
    etcd watcher gets when several revisions arrive in one response)."""

    group = 6

    async def watch_batches(self, prefix, after_revision=0):
        async with contextlib.aclosing(self.watch(prefix, after_revision)) as events:
            batch = []
            async for event in events:
                batch.append(event)
                if len(batch) == self.group:
                    yield batch
                    batch = []


def test_a_batch_is_coalesced_per_key_and_delivered_in_one_call(tmp_path):
    async def body():
        store = GroupingStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        calls: list[list[tuple]] = []
        per_key: list[tuple] = []
        mirror = PrefixMirror(store, "m/", lambda *change: per_key.append(change),
                              on_changes=lambda changes: calls.append(list(changes)))
        plain = PrefixMirror(store, "m/", lambda *change: per_key.append(change))
        try:
            await store.put("m/gone", b"0")
            mirror.start()
            plain.start()
            await asyncio.wait_for(mirror.synced.wait(), 10)
            await asyncio.wait_for(plain.synced.wait(), 10)
            listed = list(calls)
            assert listed == [[("m/gone", None, b"0")]]
            per_key.clear()
            for value in (b"1", b"2", b"3"):
                await store.put("m/a", value)
            await store.put("m/b", b"x")
            await store.delete("m/gone")
            await store.put("m/b", b"y")
            async with asyncio.timeout(10):
                while len(calls) < 2 or len(per_key) < 3:
                    await asyncio.sleep(0.02)
            # one call for the batch of six events; m/a once (its last value), m/b once
            assert calls[1:] == [[("m/a", None, b"3"), ("m/b", None, b"y"),
                                  ("m/gone", b"0", None)]]
            # without on_changes: the same coalesced changes, one on_change each
            assert sorted(per_key, key=lambda c: c[0]) == calls[1]
            assert mirror.items == plain.items == {"m/a": b"3", "m/b": b"y"}
            assert mirror.events == 6
        finally:
            await mirror.close()
            await plain.close()
            await store.close()
    asyncio.run(body())


def test_gc_policy_mid_stream_loses_no_event(tmp_path):
    """The agent's collector policy (thresholds raised, state frozen after start-up) applied
    while a mirror follows a prefix: every change still arrives, in order per key."""
    import gc

    from pylium import gcpolicy

    async def body():
        store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        seen: dict[str, bytes | None] = {}
        mirror = PrefixMirror(store, "g/", lambda key, old, new: seen.__setitem__(key, new))
        before = gc.get_threshold()
        try:
            for i in range(50):
                await store.put(f"g/{i}", b"0")
            mirror.start()
            await asyncio.wait_for(mirror.synced.wait(), 10)
            gcpolicy.tune()
            for i in range(200):
                await store.put(f"g/{i % 60}", str(i).encode())
                if i == 100:
                    gcpolicy.settle()
                if i % 7 == 0:
                    await store.delete(f"g/{(i + 3) % 60}")
            want = {item.key: item.value for item in await store.list("g/")}
            async with asyncio.timeout(10):
                while mirror.items != want:
                    await asyncio.sleep(0.02)
            assert {k: v for k, v in seen.items() if v is not None} == want
        finally:
            gc.unfreeze()
            gc.set_threshold(*before)
            await mirror.close()
            await store.close()
    asyncio.run(body())
