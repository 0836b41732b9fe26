"""How a node publishes its endpoints and reads its own records back: a burst of pod starts
goes out in a few store transactions (a lone one at once), and the node's own records
coming back through the watch are not decoded (only other nodes' are installed)."""

from __future__ import annotations

import asyncio
import time

from pylium.cluster import ipcache
from pylium.cluster.ipcache import IP_PREFIX
from pylium.cluster.sim import SimulatedNode
from pylium.kvstore.embedded import EmbeddedKVStore


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _node(tmp_path, name, number):
    store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
    await store.open()
    return await SimulatedNode(store, name, f"192.168.78.{number}",
                               f"10.78.{number}.0/24").start()


async def _stop(*nodes):
    for node in nodes:
        await node.stop()
        await node.kvstore.close()


def _count_put_many(store):
    calls = []
    original = store.put_many

    async def counted(items, lease=None):
        calls.append(len(items))
        return await original(items, lease=lease)

    store.put_many = counted
    return calls


def test_a_burst_of_pod_starts_is_published_in_few_transactions(tmp_path):
    async def go():
        node = await _node(tmp_path, "pub1", 1)
        try:
            writes = _count_put_many(node.kvstore)
            node.ipcache.set_local("10.78.1.2", 300, "default/lone")
            start = time.monotonic()
            await _until(lambda: writes == [1])
            assert time.monotonic() - start < 1.0  # a lone start goes out at once
            await asyncio.sleep(ipcache.PUBLISH_INTERVAL_S * 2)
            writes.clear()
            for i in range(20):  # 20 pods ready 1 ms apart
                node.ipcache.set_local(f"10.78.1.{10 + i}", 300, f"default/pod{i}")
                await asyncio.sleep(0.001)
            await _until(lambda: sum(writes) == 20)
            assert len(await node.kvstore.list(IP_PREFIX)) == 21
            assert len(writes) < 10, writes  # was one transaction per pod
        finally:
            await _stop(node)
    asyncio.run(go())


def test_own_records_coming_back_are_not_decoded_and_remote_ones_are_installed(
        tmp_path, monkeypatch):
    decoded = []
    real = ipcache.decode_entry

    def counting(key, value):
        decoded.append(key)
        return real(key, value)

    monkeypatch.setattr(ipcache, "decode_entry", counting)

    async def go():
        a = await _node(tmp_path, "own-a", 1)
        b = await _node(tmp_path, "own-b", 2)
        try:
            await _until(lambda: len(a.registry.nodes) == 1 and len(b.registry.nodes) == 1)
            decoded.clear()
            a.ipcache.set_local("10.78.1.5", 301, "default/web")
            await _until(lambda: "10.78.1.5/32" in {r["cidr"] for r in b.sink.dump()})
            await _until(lambda: a.ipcache.mirror.items.get(IP_PREFIX + "10.78.1.5")
                         is not None)
            await asyncio.sleep(0.05)  # any decode by `a` would have happened by now
            assert decoded == [IP_PREFIX + "10.78.1.5"]  # b's, not a's own
            assert a.sink.dump() == []  # a node never installs its own
        finally:
            await _stop(a, b)
    asyncio.run(go())
