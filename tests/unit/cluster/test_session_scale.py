"""The cluster session at scale: a large cluster probes less often (log of its size, at
most a third of the lease), and a store that says it is behind ("request timed out") is a
slow answer, not an outage (one is tolerated, two in a row degrade, as a probe timeout)."""

from __future__ import annotations

import asyncio

import pytest
from pylium.api.kvstore import KVStoreTimeout, KVStoreUnavailable
from pylium.cluster.session import DEGRADED, OK, PROBE_SCALE_FROM, ClusterSession
from pylium.kvstore.embedded import EmbeddedKVStore


def test_probe_interval_grows_with_the_cluster(tmp_path):
    store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
    session = ClusterSession(store, ttl=60, probe_interval=1.0)
    assert session.current_probe_interval == 1.0  # nobody tells the size: as configured
    size = {"n": 1}
    session.size_from(lambda: size["n"])
    seen = {}
    for n in (1, PROBE_SCALE_FROM, 100, 1000, 10**30):
        size["n"] = n
        seen[n] = session.current_probe_interval
    assert seen[1] == seen[PROBE_SCALE_FROM] == 1.0
    assert 1.5 < seen[100] < seen[1000] < 4.0  # log(1 + nodes)
    assert seen[10**30] == 20.0  # never more than a third of the lease
    short = ClusterSession(store, ttl=6, probe_interval=1.0)
    short.size_from(lambda: 1000)
    assert short.current_probe_interval == 2.0


@pytest.mark.parametrize("error,degrades_at", [(KVStoreTimeout, 2), (KVStoreUnavailable, 1)])
def test_store_timeout_is_a_slow_probe(tmp_path, error, degrades_at):
    async def go():
        store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        try:
            session = ClusterSession(store, ttl=30, probe_interval=0.2)
            await session.open()
            real = store.keepalive
            fail = {"left": 0}

            async def keepalive(lease):
                if fail["left"]:
                    fail["left"] -= 1
                    raise error("etcd at x unavailable: etcdserver: request timed out")
                return await real(lease)
            store.keepalive = keepalive
            fail["left"] = 2
            assert await session.probe() is False
            assert session.state == (DEGRADED if degrades_at == 1 else OK)
            assert await session.probe() is False
            assert session.state == DEGRADED and session.outages == 1
            assert await session.probe() is True
            assert session.state == OK
        finally:
            await store.close()
    asyncio.run(go())


def test_probe_timeout_allows_for_a_late_event_loop(tmp_path):
    store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
    session = ClusterSession(store, ttl=60, probe_interval=1.0)
    assert session.probe_timeout == 3.0
    session.loop_lag = 4.0  # the loop woke up 4 s late: 8 s more for the answer
    assert session.probe_timeout == 11.0
    session.loop_lag = 100.0
    assert session.probe_timeout == 30.0  # never more than half the lease
    assert ClusterSession(store, ttl=15).probe_timeout == 3.0


def test_a_late_answer_to_a_timed_out_probe_counts(tmp_path):
    """A keepalive that missed its probe's timeout stays in flight: if its answer arrives
    during the next probe (this agent's loop was starved, the store was not silent), the
    session stays ok; a store that answers neither degrades, as before."""
    async def go():
        store = EmbeddedKVStore({"path": str(tmp_path / "kv.sqlite3")}, tmp_path)
        await store.open()
        try:
            session = ClusterSession(store, ttl=30, probe_interval=0.2)
            await session.open()
            real = store.keepalive
            delays: list[float] = []

            async def keepalive(lease):
                await asyncio.sleep(delays.pop(0) if delays else 0)
                return await real(lease)
            store.keepalive = keepalive
            # the first answer takes 3 s (timeout 2 s), the next probe's own one 5 s: the
            # first one's answer, arriving 1 s into the second probe, counts
            delays[:] = [3.0, 5.0]
            assert await session.probe() is False
            assert await session.probe() is True
            assert session.state == OK and session.outages == 0
            # neither answers within its probe: degraded
            delays[:] = [5.0, 5.0]
            assert await session.probe() is False
            assert await session.probe() is False
            assert session.state == DEGRADED
            await asyncio.sleep(1.5)
            assert await session.probe() is True
            assert session.state == OK
            await session.close()
        finally:
            await store.close()
    asyncio.run(go())
