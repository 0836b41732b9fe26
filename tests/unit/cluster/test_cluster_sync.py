"""Node registry and ipcache sync between simulated nodes (no datapath: memory ipcache),
each with its own store connection, on the embedded store and on a real etcd."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time

import pytest
from pylium.cluster.ipcache import IP_PREFIX, encode_entry
from pylium.cluster.nodes import NODES_PREFIX
from pylium.cluster.sim import SimulatedNode
from pylium.kvstore.embedded import EmbeddedKVStore
from pylium_kvstore_etcd.backend import EtcdKVStore

_counter = itertools.count()


def run(coro):
    return asyncio.run(coro)


async def until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["embedded", "etcd"])
def open_store(request, tmp_path):
    """A factory of independent connections to one store."""
    if request.param == "embedded":
        path = tmp_path / "kv.sqlite3"

        async def make():
            store = EmbeddedKVStore({"path": str(path), "sweep_interval": 0.1}, tmp_path)
            await store.open()
            return store
    else:
        server = request.getfixturevalue("etcd_server")

        async def make():
            store = EtcdKVStore({"endpoints": [server.endpoint], "timeout": 2}, tmp_path)
            await store.open()
            return store
    return make


async def _nodes(open_store, count, ttl=15.0):
    run_id = next(_counter)
    nodes = []
    for i in range(1, count + 1):
        store = await open_store()
        nodes.append(await SimulatedNode(store, f"t{run_id}-node{i}", f"192.168.77.{i}",
                                         f"10.77.{i}.0/24", lease_ttl=ttl).start())
    return nodes


async def _close(nodes):
    for node in nodes:
        try:
            await node.stop()
        finally:
            await node.kvstore.close()


def _remote(node):
    return {row["cidr"]: (row["identity"], row["tunnel_endpoint"]) for row in node.sink.dump()}


def test_nodes_see_each_other_and_endpoints_reach_every_other_ipcache(open_store):
    async def go():
        a, b, c = await _nodes(open_store, 3)
        try:
            await until(lambda: all(len(n.registry.nodes) == 2 for n in (a, b, c)),
                        what="three nodes registered")
            assert sorted(a.registry.nodes) == sorted([b.info.name, c.info.name])
            assert {r["name"]: r["pod_cidr"] for r in a.registry.list()}[c.info.name] \
                == "10.77.3.0/24"
            a.ipcache.set_local("10.77.1.5", 300, "default/web")
            b.ipcache.set_local("10.77.2.7", 301, "default/db")
            await until(lambda: "10.77.1.5/32" in _remote(b) and "10.77.1.5/32" in _remote(c)
                        and "10.77.2.7/32" in _remote(a), what="endpoints propagated")
            assert _remote(b)["10.77.1.5/32"] == (300, "192.168.77.1")
            assert _remote(a) == {"10.77.2.7/32": (301, "192.168.77.2")}
            assert "10.77.1.5/32" not in _remote(a)  # a node never installs its own
            # identity change and deletion propagate
            a.ipcache.set_local("10.77.1.5", 302, "default/web")
            b.ipcache.remove_local("10.77.2.7")
            await until(lambda: _remote(c).get("10.77.1.5/32") == (302, "192.168.77.1")
                        and "10.77.2.7/32" not in _remote(c), what="update and delete")
            for node in (a, b, c):
                report = await node.ipcache.compare_with_store()
                assert (report["missing"], report["stale"], report["different"]) == \
                    ([], [], []), report
        finally:
            await _close([a, b, c])
    run(go())


def test_a_node_that_dies_without_cleanup_leaves_when_its_lease_expires(open_store):
    async def go():
        a, b = await _nodes(open_store, 2, ttl=2.0)
        try:
            b.ipcache.set_local("10.77.2.9", 400, "default/x")
            await until(lambda: "10.77.2.9/32" in _remote(a), what="b's endpoint at a")
            # b crashes: no revoke, no deregistration, no more keepalives
            await b.stop(revoke=False)
            assert b.info.name in a.registry.nodes  # still there until the lease runs out
            await until(lambda: b.info.name not in a.registry.nodes, timeout=20,
                        what="b's lease to expire")
            assert a.left == [b.info.name]
            await until(lambda: "10.77.2.9/32" not in _remote(a), what="b's entries gone")
            assert await a.kvstore.get(NODES_PREFIX + b.info.name) is None
            assert await a.kvstore.get(IP_PREFIX + "10.77.2.9") is None
        finally:
            await _close([a, b])
    run(go())


def test_entries_of_an_unknown_node_are_not_installed_and_a_leaving_node_takes_its_own(
        open_store):
    async def go():
        (a,) = await _nodes(open_store, 1)
        writer = await open_store()
        try:
            # an entry whose node never registered (or already left) is not reachable
            await writer.put(IP_PREFIX + "10.77.9.9", encode_entry("10.77.9.9", 500, "ghost",
                                                                   "192.168.77.9"))
            await until(lambda: "10.77.9.9" in a.ipcache.remote, what="entry seen")
            assert "10.77.9.9/32" not in _remote(a)
            (b,) = await _nodes(open_store, 1)
            b.ipcache.set_local("10.77.5.5", 501)
            await until(lambda: "10.77.5.5/32" in _remote(a), what="b's entry")
            # b deregisters cleanly: node and entries go at once
            await b.stop(revoke=True)
            await b.kvstore.close()
            await until(lambda: "10.77.5.5/32" not in _remote(a) and not a.registry.nodes,
                        what="b gone")
        finally:
            await writer.close()
            await _close([a])
    run(go())


def test_reconcile_removes_stale_remote_entries_left_in_the_ipcache(open_store):
    """An agent restarting over a pinned ipcache: remote /32s the store no longer has go,
    local and CIDR entries stay."""
    async def go():
        store = await open_store()
        from pylium.cluster.ipcache import MemorySink

        node = SimulatedNode(store, f"t{next(_counter)}-solo", "192.168.77.1", "10.77.1.0/24")
        node.sink = node.ipcache.sink = MemorySink()
        node.sink.upsert("10.77.3.3/32", 600, "192.168.77.3")   # stale remote endpoint
        node.sink.upsert("10.77.1.4/32", 601, None)             # a local endpoint
        node.sink.upsert("198.51.100.0/24", 16777217, None)     # a CIDR identity
        try:
            await node.start()
            assert _remote(node) == {"10.77.1.4/32": (601, None),
                                     "198.51.100.0/24": (16777217, None)}
        finally:
            await _close([node])
    run(go())


def test_etcd_outage_degrades_then_resyncs_without_stale_entries(etcd_server, tmp_path):
    """etcd goes away for a few seconds; meanwhile a node dies. The survivors report
    degraded, keep their ipcache untouched during the outage, then resync: the dead node's
    entries are gone (its lease expired after etcd came back) and nothing else changed."""
    async def make():
        store = EtcdKVStore({"endpoints": [etcd_server.endpoint], "timeout": 1,
                             "retry_interval": 0.2}, tmp_path)
        await store.open()
        return store

    async def go():
        a, b, c = await _nodes(make, 3, ttl=3.0)
        try:
            for i, node in enumerate((a, b, c), start=1):
                node.ipcache.set_local(f"10.77.{i}.10", 700 + i)
            await until(lambda: all(len(_remote(n)) == 2 for n in (a, b, c)), what="sync")
            before = _remote(a)
            await c.stop(revoke=False)   # c dies ...
            etcd_server.stop()           # ... and etcd goes down
            try:
                await until(lambda: not a.session.healthy and not b.session.healthy,
                            what="degraded")
                await asyncio.sleep(2)
                assert _remote(a) == before  # enforcement data untouched while degraded
            finally:
                etcd_server.start()
            await until(lambda: a.session.healthy and b.session.healthy, timeout=20,
                        what="recovery")
            assert a.session.outages == 1 and a.session.resyncs >= 1
            # etcd restores leases with a fresh TTL; c's then expires for good
            await until(lambda: c.info.name not in a.registry.nodes
                        and c.info.name not in b.registry.nodes, timeout=20, what="c expired")
            assert _remote(a) == {"10.77.2.10/32": (702, "192.168.77.2")}
            assert _remote(b) == {"10.77.1.10/32": (701, "192.168.77.1")}
            for node in (a, b):
                report = await node.ipcache.compare_with_store()
                assert (report["missing"], report["stale"], report["different"]) == \
                    ([], [], []), report
        finally:
            if not etcd_server.running:
                etcd_server.start()
            await _close([a, b, c])
    run(go())


def test_a_lost_lease_is_replaced_and_everything_republished(open_store):
    """The node's lease ends under it (expired during a long outage, revoked by an
    operator): the others drop the node, then it takes a new lease, rewrites its node entry
    and endpoints, and the others add it back."""
    async def go():
        a, b = await _nodes(open_store, 2)
        try:
            a.ipcache.set_local("10.77.1.44", 900, "default/p")
            await until(lambda: "10.77.1.44/32" in _remote(b), what="a's endpoint at b")
            old = a.session.lease
            await b.kvstore.revoke_lease(old)
            await until(lambda: a.info.name not in b.registry.nodes or
                        a.session.lease_renewals, what="a gone or renewed")
            await until(lambda: a.session.lease_renewals == 1, what="a renews its lease")
            assert a.session.lease.id != old.id
            await until(lambda: a.info.name in b.registry.nodes
                        and "10.77.1.44/32" in _remote(b), what="a back at b")
            item = await b.kvstore.get(IP_PREFIX + "10.77.1.44")
            assert item is not None and item.lease == a.session.lease.id
        finally:
            await _close([a, b])
    run(go())


def test_restarted_agent_moves_its_endpoints_onto_its_new_lease(open_store):
    """An agent restarts (new lease) with the same local endpoints: the keys its previous
    run wrote stay published after the previous lease runs out."""
    async def go():
        name = f"t{next(_counter)}-restart"
        first = SimulatedNode(await open_store(), name, "192.168.77.1", "10.77.1.0/24",
                              lease_ttl=2.0)
        first.ipcache.set_local("10.77.1.5", 900)
        await first.start()
        await until(lambda: bool(first.ipcache.published), what="published")
        await first.stop(revoke=False)  # a restart: the old lease lives on for a while
        await first.kvstore.close()
        second = SimulatedNode(await open_store(), name, "192.168.77.1", "10.77.1.0/24",
                               lease_ttl=2.0)
        second.ipcache.set_local("10.77.1.5", 900)
        try:
            await second.start()
            await asyncio.sleep(4.0)  # the first run's lease has expired by now
            item = await second.kvstore.get(IP_PREFIX + "10.77.1.5")
            assert item is not None
            assert item.lease == second.session.lease.id
        finally:
            await _close([second])
    run(go())


def test_etcd_back_with_a_wiped_data_dir_is_rebuilt_and_nothing_flaps(tmp_path):
    """etcd restarts empty (its data dir wiped). Every node notices (its lease is gone and so
    is the cluster's incarnation key), writes back its node and endpoints, and meanwhile
    keeps the other nodes' entries (the followers' reset grace): no remote entry vanishes
    from an ipcache at any moment, and the store ends up with everything again."""
    from pylium.cluster.session import INCARNATION_KEY
    from pylium.kvstore.testing import EtcdServer

    with EtcdServer(name="pylium-wipe") as server:
        async def make():
            store = EtcdKVStore({"endpoints": [server.endpoint], "timeout": 1,
                                 "retry_interval": 0.2}, tmp_path)
            await store.open()
            return store

        async def go():
            a, b = await _nodes(make, 2, ttl=3.0)
            try:
                a.ipcache.set_local("10.77.1.10", 701)
                b.ipcache.set_local("10.77.2.10", 702)
                await until(lambda: all(len(_remote(n)) == 1 for n in (a, b)), what="sync")
                before = {n.info.name: _remote(n) for n in (a, b)}
                incarnation = a.session.incarnation
                assert incarnation and b.session.incarnation == incarnation
                # b is slow to notice (its session paused): a lists the empty store first
                b.session._task.cancel()
                await asyncio.gather(b.session._task, return_exceptions=True)
                await asyncio.to_thread(server.stop)
                shutil.rmtree(server.data_dir)
                await asyncio.to_thread(server.start)

                def no_flap():
                    for n in (a, b):  # never a moment without the other node's entry
                        assert _remote(n) == before[n.info.name]
                        assert list(n.registry.nodes) == \
                            [m.info.name for m in (a, b) if m is not n]

                await until(lambda: no_flap() or (a.ipcache.mirror.resets >= 1
                                                  and a.session.wipes == 1
                                                  and a.ipcache.mirror.lists >= 2),
                            what="a relisted the wiped store")
                await asyncio.sleep(1)
                no_flap()
                b.session.start()
                deadline = time.monotonic() + 30
                while True:
                    no_flap()
                    done = (a.session.healthy and b.session.healthy
                            and a.session.wipes == 1 and b.session.wipes == 1
                            and len(await a.kvstore.list(IP_PREFIX)) == 2
                            and len(await a.kvstore.list(NODES_PREFIX)) == 2)
                    if done:
                        break
                    assert time.monotonic() < deadline, "not rebuilt in 30 s"
                    await asyncio.sleep(0.1)
                assert a.session.incarnation == b.session.incarnation != incarnation
                item = await a.kvstore.get(INCARNATION_KEY)
                assert item.value.decode() == a.session.incarnation
                for n in (a, b):
                    report = await n.ipcache.compare_with_store()
                    assert (report["missing"], report["stale"], report["different"]) == \
                        ([], [], []), report
                # the grace is over and nothing was dropped: the entries were written back
                await asyncio.sleep(a.session.reset_grace + 1)
                assert {n.info.name: _remote(n) for n in (a, b)} == before
            finally:
                if not server.running:
                    server.start()
                await _close([a, b])
        run(go())
