"""Cluster state: identity allocations per second, ipcache convergence between two nodes,
and convergence of many simulated nodes after 1,000 endpoint changes.

- Identity allocations/s: 3 nodes (one store connection each) allocating new label sets
  concurrently through `IdentityAllocator` (create id → reference → fence → index), on a
  real etcd (Debian 3.4, loopback) vs the embedded store (one SQLite file the three share).
  Also "repeat" allocations (label set already known: reference + fence).
- ipcache convergence: node A publishes a new endpoint; time until node B's ipcache sync
  has installed it (sink = memory: these nodes have no datapath). Median of 100. Note: the
  embedded store's nodes here share one process, so its watchers are woken directly; two
  agent processes find changes by polling every 20 ms.
- Scale: N simulated nodes (session + node registry + ipcache sync, memory ipcache, one
  etcd connection each) against one etcd; 1,000 endpoints published round-robin; time
  until every node's ipcache holds every other node's endpoints. Curve for N = 10, 30,
  100. Baseline: the naive approach of re-listing the prefix every second on every node
  and applying the difference (what polling a store without watches costs), measured for
  100 nodes on the same etcd; also the CPU both burn (agents + etcd) while nothing
  changes.
Cilium's scale report (1,000 nodes / 50k pods) is the anchor; this machine has 2 cores and
runs all nodes in one Python process, so read the curve, not the absolute numbers."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from pylium.cluster.ipcache import IP_PREFIX, MemorySink, encode_entry  # noqa: E402
from pylium.cluster.sim import SimulatedNode  # noqa: E402
from pylium.identity.allocator import IdentityAllocator  # noqa: E402
from pylium.identity.labels import LabelSet  # noqa: E402
from pylium.kvstore.embedded import EmbeddedKVStore  # noqa: E402
from pylium.kvstore.testing import EtcdServer  # noqa: E402
from pylium_kvstore_etcd.backend import EtcdKVStore  # noqa: E402

ALLOC_SETS = 300
ALLOC_CONCURRENCY = 8
CONVERGE_SAMPLES = 100
CHANGES = 1000
SCALE_NODES = (10, 30, 100)
POLL_INTERVAL = 1.0
IDLE_SECONDS = 3.0


def etcd_factory(server: EtcdServer, tmp: Path):
    async def make():
        store = EtcdKVStore({"endpoints": [server.endpoint], "timeout": 30}, tmp)
        await store.open()
        return store
    return make


def embedded_factory(tmp: Path):
    path = tmp / f"kv-{time.monotonic_ns()}.sqlite3"

    async def make():
        store = EmbeddedKVStore({"path": str(path)}, tmp)
        await store.open()
        return store
    return make


async def _wipe(store) -> None:
    await store.delete_prefix("pylium/")


async def allocations_per_second(make) -> tuple[float, float]:
    stores = [await make() for _ in range(3)]
    await _wipe(stores[0])
    try:
        allocators = [IdentityAllocator(s, f"n{i}", await s.grant_lease(60))
                      for i, s in enumerate(stores)]
        sets = [LabelSet.parse(f"app=a{i},team=t{i % 7}") for i in range(ALLOC_SETS)]
        rates = []
        for _round in ("new", "repeat"):
            queue: asyncio.Queue = asyncio.Queue()
            for i, labels in enumerate(sets):
                queue.put_nowait((allocators[i % 3], labels))

            async def worker(queue: asyncio.Queue = queue) -> None:
                while not queue.empty():
                    allocator, labels = queue.get_nowait()
                    await allocator.allocate(labels)
            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(ALLOC_CONCURRENCY * 3)))
            rates.append(len(sets) / (time.perf_counter() - began))
        return rates[0], rates[1]
    finally:
        for s in stores:
            await s.close()


async def convergence_ms(make) -> float:
    store_a, store_b = await make(), await make()
    await _wipe(store_a)
    a = await SimulatedNode(store_a, "bench-a", "192.168.50.1", "10.50.1.0/24").start()
    b = await SimulatedNode(store_b, "bench-b", "192.168.50.2", "10.50.2.0/24").start()
    seen: dict[str, float] = {}
    upsert = b.sink.upsert

    def timed(cidr, identity, tunnel):
        seen.setdefault(cidr, time.perf_counter())
        upsert(cidr, identity, tunnel)
    b.sink.upsert = timed
    try:
        while "bench-a" not in b.registry.nodes:
            await asyncio.sleep(0.01)
        samples = []
        for i in range(CONVERGE_SAMPLES):
            ip = f"10.50.1.{i + 2}"
            began = time.perf_counter()
            a.ipcache.set_local(ip, 1000 + i)
            while f"{ip}/32" not in seen:
                await asyncio.sleep(0.0005)
            samples.append((seen[f"{ip}/32"] - began) * 1000)
        return statistics.median(samples)
    finally:
        for node in (a, b):
            await node.stop()
            await node.kvstore.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (this one, or etcd)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _idle_cpu(etcd_pid: int) -> float:
    """CPU seconds per second (agents' process + etcd) while nothing changes."""
    began = _cpu_seconds(os.getpid()) + _cpu_seconds(etcd_pid)
    await asyncio.sleep(IDLE_SECONDS)
    return (_cpu_seconds(os.getpid()) + _cpu_seconds(etcd_pid) - began) / IDLE_SECONDS


async def scale_converge(make, count: int, etcd_pid: int) -> dict[str, float]:
    """Start `count` nodes, publish CHANGES endpoints round-robin, wait until every node's
    ipcache holds every other node's; then measure idle CPU."""
    first = await make()
    await _wipe(first)
    await first.close()
    began = time.perf_counter()
    stores = await asyncio.gather(*(make() for _ in range(count)))
    nodes = [SimulatedNode(s, f"sim{i}", f"10.250.{i // 250}.{i % 250 + 1}",
                           f"10.{100 + i // 200}.{i % 200}.0/24", lease_ttl=30)
             for i, s in enumerate(stores)]
    await asyncio.gather(*(n.start() for n in nodes))
    while not all(len(n.registry.nodes) == count - 1 for n in nodes):
        await asyncio.sleep(0.02)
    joined = time.perf_counter() - began
    try:
        owner = {}
        began = time.perf_counter()
        for i in range(CHANGES):
            node = nodes[i % count]
            ip = f"10.{100 + (i % count) // 200}.{(i % count) % 200}.{i // count + 2}"
            owner[ip] = node
            node.ipcache.set_local(ip, 2000 + i % 500)
        expected = {n.info.name: sum(1 for o in owner.values() if o is not n) for n in nodes}
        while not all(len(n.ipcache.installed) == expected[n.info.name] for n in nodes):
            await asyncio.sleep(0.02)
        converged = time.perf_counter() - began
        return {"joined": joined, "converged": converged,
                "idle_cpu": await _idle_cpu(etcd_pid)}
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
        await asyncio.gather(*(s.close() for s in stores))


async def polling_converge(make, count: int, etcd_pid: int) -> dict[str, float]:
    """The naive baseline: every node re-lists the whole prefix every POLL_INTERVAL s and
    applies the difference to its ipcache (same decoding and memory ipcache as the real
    sync), writers publish the same CHANGES endpoints from `count` nodes."""
    stores = await asyncio.gather(*(make() for _ in range(count)))
    await _wipe(stores[0])
    sinks = [MemorySink() for _ in range(count)]
    stop = asyncio.Event()

    async def poller(index: int, store) -> None:
        await asyncio.sleep(POLL_INTERVAL * index / count)  # spread, as real agents are
        sink, name = sinks[index], f"sim{index}"
        while not stop.is_set():
            wanted = {}
            for item in await store.list(IP_PREFIX):
                data = json.loads(item.value)
                if data["node"] != name:
                    wanted[item.key[len(IP_PREFIX):] + "/32"] = (data["identity"],
                                                                  data["node_ip"])
            for cidr in [c for c in sink.entries if c not in wanted]:
                sink.delete(cidr)
            for cidr, (identity, tunnel) in wanted.items():
                if sink.entries.get(cidr) != (identity, tunnel):
                    sink.upsert(cidr, identity, tunnel)
            await asyncio.sleep(POLL_INTERVAL)
    tasks = [asyncio.create_task(poller(i, s)) for i, s in enumerate(stores)]
    try:
        await asyncio.sleep(POLL_INTERVAL)
        began = time.perf_counter()

        async def publish(index: int) -> None:
            for i in range(index, CHANGES, count):
                ip = f"10.{100 + index // 200}.{index % 200}.{i // count + 2}"
                await stores[index].put(IP_PREFIX + ip, encode_entry(
                    ip, 2000 + i % 500, f"sim{index}", f"10.250.0.{index + 1}"))
        await asyncio.gather(*(publish(i) for i in range(count)))
        per_node = CHANGES // count
        while not all(len(sink.entries) == CHANGES - per_node for sink in sinks):
            await asyncio.sleep(0.02)
        converged = time.perf_counter() - began
        return {"converged": converged, "idle_cpu": await _idle_cpu(etcd_pid)}
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stores[0].delete_prefix(IP_PREFIX)
        await asyncio.gather(*(s.close() for s in stores))


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pylium-bench-cluster-") as tmp_name, \
            EtcdServer() as etcd:
        tmp = Path(tmp_name)
        etcd_make = etcd_factory(etcd, tmp)
        new_etcd, repeat_etcd = await allocations_per_second(etcd_make)
        new_emb, repeat_emb = await allocations_per_second(embedded_factory(tmp))
        report("cluster", "identity_allocations_new_label_sets", "allocations/s", new_etcd,
               new_emb, "embedded store (3 connections to one SQLite file)", "higher",
               pylium_store="etcd 3.4 loopback", nodes=3, concurrency=ALLOC_CONCURRENCY * 3)
        report("cluster", "identity_allocations_known_label_sets", "allocations/s",
               repeat_etcd, repeat_emb, "embedded store (3 connections to one SQLite file)",
               "higher", pylium_store="etcd 3.4 loopback", nodes=3)
        conv_etcd = await convergence_ms(etcd_make)
        conv_emb = await convergence_ms(embedded_factory(tmp))
        report("cluster", "ipcache_convergence_median", "ms", conv_etcd, conv_emb,
               "embedded store (same process: watchers woken directly)", "lower",
               pylium_store="etcd 3.4 loopback", samples=CONVERGE_SAMPLES)
        curve = {}
        etcd_pid = etcd.process.pid
        for count in SCALE_NODES:
            curve[count] = await scale_converge(etcd_make, count, etcd_pid)
            print(f"# {count} simulated nodes: all joined in {curve[count]['joined']:.2f}s, "
                  f"{CHANGES} endpoint changes converged on every node in "
                  f"{curve[count]['converged']:.2f}s, idle CPU "
                  f"{curve[count]['idle_cpu']:.2f} s/s", flush=True)
        largest = SCALE_NODES[-1]
        polled = await polling_converge(etcd_make, largest, etcd_pid)
        baseline = f"every node re-lists the prefix every {POLL_INTERVAL:g}s"
        report("cluster", f"converge_{largest}_nodes_after_{CHANGES}_changes", "s",
               curve[largest]["converged"], polled["converged"], baseline, "lower",
               curve={str(k): round(v["converged"], 3) for k, v in curve.items()},
               join_seconds={str(k): round(v["joined"], 3) for k, v in curve.items()},
               events_delivered=largest * CHANGES, all_nodes_in_one_process=True)
        report("cluster", f"idle_cpu_{largest}_nodes_{CHANGES}_endpoints", "cpu s/s",
               curve[largest]["idle_cpu"], polled["idle_cpu"], baseline, "lower",
               note="agents' process + etcd, nothing changing; watch side includes "
                    "one lease keepalive per node per second")


if __name__ == "__main__":
    asyncio.run(main())
