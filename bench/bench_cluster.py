"""Cluster state on one real etcd (Debian 3.4, loopback), each pylium figure against a real
alternative on the same store, connections and concurrency (never another pylium backend):

- Identity allocations/s: 3 nodes (one store connection each) allocating label sets
  concurrently through `IdentityAllocator` (id claim, reference, fence, index: safe against
  concurrent garbage collection) vs the naive etcd allocator a user could write: a
  compare-and-swap counter plus a create-if-absent label key (no references, no garbage
  collection). New label sets and already-known ones; 5 interleaved rounds each.
- ipcache convergence: node A publishes an endpoint, time until node B's ipcache sink has
  it. pylium: `IPCacheSync` (lease-bound publish, node registry, prefix mirror) vs a raw
  etcd watch without our cache (one put, one watch decoding into the same sink). Samples
  alternate; medians and p90.
- Scale: N simulated nodes (session + node registry + ipcache sync, memory ipcache, one
  etcd connection each) against one etcd; 1,000 endpoints published round-robin; time
  until every node's ipcache holds every other node's endpoints. Curve for N = 10, 30,
  100 in one process, and 1,000 spread over worker processes (`PYLIUM_BENCH_CLUSTER_BIG`).
  Baseline: naive re-list polling (every node lists the prefix every second and applies
  the difference), interleaved with pylium for 5 rounds at 100 nodes; also the agents'
  CPU until convergence, the CPU both burn (agents + etcd) while nothing changes, and
  etcd's own CPU during convergence.
The process runs with the agent's garbage-collector policy (`pylium.gcpolicy`, what
`pylium agent` does: raised thresholds, the start-up state frozen), both sides alike
(`PYLIUM_BENCH_CLUSTER_GC=default` for CPython's defaults). The 1,000-node workers run at
nice 10: in a real cluster those agents run on other machines, here at equal priority they
starve the one etcd. This machine has 2 cores shared with other work and runs all nodes in
one Python process: read the ratios and the curve, not the absolute numbers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report, report_rounds  # noqa: E402
from pylium import gcpolicy  # noqa: E402
from pylium.cluster.ipcache import IP_PREFIX, MemorySink, encode_entry  # noqa: E402
from pylium.cluster.sim import SimulatedNode  # noqa: E402
from pylium.identity.allocator import IdentityAllocator  # noqa: E402
from pylium.identity.labels import LabelSet  # noqa: E402
from pylium.kvstore.testing import EtcdServer  # noqa: E402
from pylium_kvstore_etcd.backend import EtcdKVStore  # noqa: E402

ALLOC_SETS = 300
ALLOC_CONCURRENCY = 8
CONVERGE_SAMPLES = 100
CHANGES = 1000
SCALE_NODES = (10, 30, 100)
#: the far end of the curve: nodes spread over worker processes (each node still has its
#: own etcd connection, session, registry and ipcache watch), "NODESxPROCESSES"; "0" skips
BIG = os.environ.get("PYLIUM_BENCH_CLUSTER_BIG", "1000x8")
BIG_TIMEOUT_S = float(os.environ.get("PYLIUM_BENCH_CLUSTER_BIG_TIMEOUT", "600"))
GOAL_BIG_CONVERGE_S = 10.0
#: worker processes run below etcd's priority: in a real cluster the 1,000 agents run on
#: 1,000 other machines, here they share 2 cores with the one etcd they all talk to, and at
#: equal priority they starve it (its apply falls behind: "request timed out")
WORKER_NICE = 10
POLL_INTERVAL = 1.0
IDLE_SECONDS = 3.0
ROUNDS = 5
GOAL_CONVERGE_S = 2.0
#: "agent": the process runs with the agent's collector settings (`pylium.gcpolicy`: raised
#: thresholds, start-up state frozen), both sides alike, as a real agent would; "default":
#: CPython's defaults (for A/B runs)
GC_POLICY = os.environ.get("PYLIUM_BENCH_CLUSTER_GC", "agent")


def _settle() -> None:
    """Before a timed window, either side: no garbage of the previous round, and (agent
    policy) what is alive now frozen, as the agent does after start-up."""
    gc.unfreeze()  # the previous round's frozen state is garbage by now
    if GC_POLICY == "agent":
        gcpolicy.settle()
    else:
        gc.collect()


def etcd_factory(server: EtcdServer, tmp: Path):
    async def make():
        store = EtcdKVStore({"endpoints": [server.endpoint], "timeout": 30}, tmp)
        await store.open()
        return store
    return make


async def _wipe(store) -> None:
    await store.delete_prefix("pylium/")


NAIVE_PREFIX = "pylium/bench-naive/"


async def naive_allocate(store, labels: LabelSet) -> int:
    """The naive allocator: the label set's key names its number; a new number comes from a
    compare-and-swap counter. Correct ids, but no references and no garbage collection."""
    key = NAIVE_PREFIX + "labels/" + labels.key_string()
    counter = NAIVE_PREFIX + "counter"
    for _attempt in range(1000):
        known = await store.get(key)
        if known is not None:
            return int(known.value)
        current = await store.get(counter)
        number = int(current.value) + 1 if current is not None else 256
        if current is None:
            claimed = await store.create(counter, str(number).encode())
        else:
            claimed = await store.compare_and_swap(counter, current.mod_revision,
                                                   str(number).encode())
        if claimed and await store.create(key, str(number).encode()):
            return number
    raise RuntimeError("naive allocator: too much contention")


async def allocation_rates(make) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """{"new": [...], "known": [...]} allocations/s per round, for pylium and the naive one."""
    stores = [await make() for _ in range(3)]
    await _wipe(stores[0])
    try:
        allocators = [IdentityAllocator(s, f"n{i}", await s.grant_lease(60))
                      for i, s in enumerate(stores)]

        async def rate(allocate, sets) -> float:
            queue: asyncio.Queue = asyncio.Queue()
            for i, labels in enumerate(sets):
                queue.put_nowait((i % 3, labels))

            async def worker() -> None:
                while not queue.empty():
                    node, labels = queue.get_nowait()
                    await allocate(node, labels)
            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(ALLOC_CONCURRENCY * 3)))
            return len(sets) / (time.perf_counter() - began)

        async def ours(node, labels):
            await allocators[node].allocate(labels)

        async def naive(node, labels):
            await naive_allocate(stores[node], labels)

        results = {"pylium": {"new": [], "known": []}, "naive": {"new": [], "known": []}}
        for r in range(ROUNDS):
            for side, allocate in (("naive", naive), ("pylium", ours)):
                sets = [LabelSet.parse(f"app=a{r}x{i},team=t{i % 7},side={side}")
                        for i in range(ALLOC_SETS)]
                results[side]["new"].append(await rate(allocate, sets))
                results[side]["known"].append(await rate(allocate, sets))
        return results["pylium"], results["naive"]
    finally:
        for s in stores:
            await s.close()


RAW_PREFIX = "pylium/bench-raw/ip/"


async def convergence_samples(make) -> tuple[list[float], list[float]]:
    """ms from publish to the other node's sink, pylium and the raw watch alternating."""
    store_a, store_b = await make(), await make()
    raw_writer, raw_reader = await make(), await make()
    await _wipe(store_a)
    a = await SimulatedNode(store_a, "bench-a", "192.168.50.1", "10.50.1.0/24").start()
    b = await SimulatedNode(store_b, "bench-b", "192.168.50.2", "10.50.2.0/24").start()
    seen: dict[str, float] = {}
    upsert = b.sink.upsert

    def timed(cidr, identity, tunnel):
        seen.setdefault(cidr, time.perf_counter())
        upsert(cidr, identity, tunnel)
    b.sink.upsert = timed
    raw_sink = MemorySink()
    raw_seen: dict[str, float] = {}

    async def raw_watch() -> None:
        async for event in raw_reader.watch(RAW_PREFIX, await raw_reader.revision()):
            if event.type == "put":
                data = json.loads(event.value)
                cidr = event.key[len(RAW_PREFIX):] + "/32"
                raw_sink.upsert(cidr, data["identity"], data["node_ip"])
                raw_seen.setdefault(cidr, time.perf_counter())
    watcher = asyncio.create_task(raw_watch())
    try:
        while "bench-a" not in b.registry.nodes:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the raw watch is established
        ours, theirs = [], []
        for i in range(CONVERGE_SAMPLES):
            ip = f"10.50.1.{i + 2}"
            began = time.perf_counter()
            await raw_writer.put(RAW_PREFIX + ip, encode_entry(ip, 1000 + i, "bench-a",
                                                               "192.168.50.1"))
            while f"{ip}/32" not in raw_seen:
                await asyncio.sleep(0.0005)
            theirs.append((raw_seen[f"{ip}/32"] - began) * 1000)
            began = time.perf_counter()
            a.ipcache.set_local(ip, 1000 + i)
            while f"{ip}/32" not in seen:
                await asyncio.sleep(0.0005)
            ours.append((seen[f"{ip}/32"] - began) * 1000)
        return ours, theirs
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for node in (a, b):
            await node.stop()
            await node.kvstore.close()
        await raw_writer.delete_prefix(RAW_PREFIX)
        for store in (raw_writer, raw_reader):
            await store.close()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (this one, or etcd)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _idle_cpu(etcd_pid: int) -> float:
    """CPU seconds per second (agents' process + etcd) while nothing changes."""
    began = _cpu_seconds(os.getpid()) + _cpu_seconds(etcd_pid)
    await asyncio.sleep(IDLE_SECONDS)
    return (_cpu_seconds(os.getpid()) + _cpu_seconds(etcd_pid) - began) / IDLE_SECONDS


async def scale_converge(make, count: int, etcd_pid: int,
                         idle: bool = True) -> dict[str, float]:
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
        _settle()  # the start-up (join) state frozen, nothing left from the previous round
        etcd_cpu = _cpu_seconds(etcd_pid)
        agent_cpu = time.process_time()
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
        agent_cpu = time.process_time() - agent_cpu
        etcd_cpu = _cpu_seconds(etcd_pid) - etcd_cpu
        return {"joined": joined, "converged": converged, "etcd_cpu": etcd_cpu,
                "agent_cpu": agent_cpu, "load": os.getloadavg()[0],
                "idle_cpu": await _idle_cpu(etcd_pid) if idle else None}
    finally:
        await asyncio.gather(*(n.stop() for n in nodes))
        await asyncio.gather(*(s.close() for s in stores))


async def polling_converge(make, count: int, etcd_pid: int,
                           idle: bool = True) -> dict[str, float]:
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
        _settle()  # as scale_converge, the same for both sides
        etcd_cpu = _cpu_seconds(etcd_pid)
        agent_cpu = time.process_time()
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
        agent_cpu = time.process_time() - agent_cpu
        etcd_cpu = _cpu_seconds(etcd_pid) - etcd_cpu
        return {"converged": converged, "etcd_cpu": etcd_cpu, "agent_cpu": agent_cpu,
                "load": os.getloadavg()[0],
                "idle_cpu": await _idle_cpu(etcd_pid) if idle else None}
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stores[0].delete_prefix(IP_PREFIX)
        await asyncio.gather(*(s.close() for s in stores))


async def main() -> None:
    if GC_POLICY == "agent":
        gcpolicy.tune()
    with tempfile.TemporaryDirectory(prefix="pylium-bench-cluster-") as tmp_name, \
            EtcdServer() as etcd:
        tmp = Path(tmp_name)
        etcd_make = etcd_factory(etcd, tmp)
        ours, naive = await allocation_rates(etcd_make)
        naive_name = ("naive etcd allocator: CAS counter + create-if-absent label key "
                      "(no references, no garbage collection), same etcd and concurrency")
        for kind in ("new", "known"):
            report_rounds("cluster", f"identity_allocations_{kind}_label_sets", "allocations/s",
                          ours[kind], naive[kind], naive_name,
                          "higher is better; ratio >= 0.5 (GC safety costs at most half)",
                          lambda a, b: a >= 0.5 * b, store="etcd 3.4 loopback", nodes=3,
                          concurrency=ALLOC_CONCURRENCY * 3, label_sets=ALLOC_SETS)
        conv_ours, conv_raw = await convergence_samples(etcd_make)
        med_ours, med_raw = statistics.median(conv_ours), statistics.median(conv_raw)
        report("cluster", "ipcache_convergence_median", "ms", med_ours, med_raw,
               "raw etcd watch without our cache (one put, one watch, same sink)",
               "lower is better; ratio <= 2 (our sync adds at most one store round trip)",
               met=med_ours <= 2 * med_raw, samples=CONVERGE_SAMPLES,
               pylium_p90=round(_p90(conv_ours), 3), baseline_p90=round(_p90(conv_raw), 3),
               store="etcd 3.4 loopback")
        curve = {}
        etcd_pid = etcd.process.pid
        for count in SCALE_NODES:
            curve[count] = await scale_converge(etcd_make, count, etcd_pid)
            print(f"# {count} simulated nodes: all joined in {curve[count]['joined']:.2f}s, "
                  f"{CHANGES} endpoint changes converged on every node in "
                  f"{curve[count]['converged']:.2f}s (etcd CPU {curve[count]['etcd_cpu']:.2f}"
                  f" s), idle CPU {curve[count]['idle_cpu']:.2f} s/s", flush=True)
        largest = SCALE_NODES[-1]
        polled = [await polling_converge(etcd_make, largest, etcd_pid)]
        watched = [curve[largest]]
        for _ in range(ROUNDS - 1):  # interleaved: polling, then watching
            polled.append(await polling_converge(etcd_make, largest, etcd_pid, idle=False))
            watched.append(await scale_converge(etcd_make, largest, etcd_pid, idle=False))
        baseline = f"naive re-list polling: every node lists the prefix every {POLL_INTERVAL:g}s"
        report_rounds("cluster", f"converge_{largest}_nodes_after_{CHANGES}_changes", "s",
                      [w["converged"] for w in watched], [p["converged"] for p in polled],
                      baseline, f"lower is better; ratio < 1 and < {GOAL_CONVERGE_S:g} s "
                      "(issue 16)",
                      lambda a, b: a < b and a < GOAL_CONVERGE_S,
                      curve={str(k): round(v["converged"], 3) for k, v in curve.items()},
                      join_seconds={str(k): round(v["joined"], 3) for k, v in curve.items()},
                      etcd_cpu_seconds={"pylium": round(statistics.median(
                          w["etcd_cpu"] for w in watched), 3), "polling": round(
                          statistics.median(p["etcd_cpu"] for p in polled), 3)},
                      events_delivered=largest * CHANGES, all_nodes_in_one_process=True)
        report_rounds("cluster", f"converge_{largest}_nodes_agent_cpu", "cpu s",
                      [w["agent_cpu"] for w in watched], [p["agent_cpu"] for p in polled],
                      baseline, "lower is better; ratio < 1 (CPU the agents' process burns "
                      "until every node has converged; wall time on a shared box measures "
                      "the neighbours too)", lambda a, b: a < b,
                      load_average=[round(w["load"], 1) for w in watched],
                      all_nodes_in_one_process=True)
        if BIG != "0":
            count, processes = (int(x) for x in BIG.split("x"))
            try:
                async with asyncio.timeout(BIG_TIMEOUT_S):
                    big = await scale_converge_processes(etcd, count, processes, tmp)
                converged, met = big["converged"], big["converged"] < GOAL_BIG_CONVERGE_S
                extra = {"joined_seconds": round(big["joined"], 2),
                         "etcd_cpu_seconds": round(big["etcd_cpu"], 2),
                         "agent_cpu_seconds": round(big["agent_cpu"], 2),
                         "load_average": round(big["load"], 1)}
            except (TimeoutError, RuntimeError) as exc:
                converged, met = BIG_TIMEOUT_S, False
                extra = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
            report("cluster", f"converge_{count}_nodes_{processes}_processes_after_{CHANGES}"
                   "_changes", "s", converged, GOAL_BIG_CONVERGE_S,
                   f"issue 16 goal (< {GOAL_BIG_CONVERGE_S:g} s on one etcd; polling is not "
                   "raced at this size)", f"lower is better; < {GOAL_BIG_CONVERGE_S:g} s",
                   met=met, processes=processes, store="etcd 3.4 loopback",
                   curve={**{str(k): round(v["converged"], 3) for k, v in curve.items()},
                          str(count): round(converged, 3)}, **extra)
        report("cluster", f"idle_cpu_{largest}_nodes_{CHANGES}_endpoints", "cpu s/s",
               curve[largest]["idle_cpu"], polled[0]["idle_cpu"], baseline,
               "lower is better; ratio <= 1", met=curve[largest]["idle_cpu"]
               <= polled[0]["idle_cpu"],
               note="agents' process + etcd, nothing changing; watch side includes "
                    "one lease keepalive per node every 1-2 s (the session's probe interval "
                    "grows with log(1 + nodes) from 8 nodes on); one sample each")


# many processes ------------------------------------------------------------------------

def _endpoint_ip(i: int, count: int) -> str:
    """The i-th endpoint change's address (owned by node i % count), as scale_converge."""
    return f"10.{100 + (i % count) // 200}.{(i % count) % 200}.{i // count + 2}"


async def worker(endpoint: str, first: int, share: int, total: int) -> None:
    """One process of a many-process run: nodes first..first+share-1 of `total`, each with
    its own etcd connection, session, node registry and ipcache watch. Talks to the parent
    over stdin/stdout: `joined` → (go) → `converged <unix time> <cpu s>` → (stop)."""
    os.nice(WORKER_NICE)
    if GC_POLICY == "agent":
        gcpolicy.tune()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    with tempfile.TemporaryDirectory(prefix="pylium-bench-cluster-worker-") as tmp_name:
        await _worker_nodes(endpoint, first, share, total, lines, Path(tmp_name))


async def _worker_nodes(endpoint: str, first: int, share: int, total: int,
                        lines: asyncio.Queue, tmp: Path) -> None:
    async def make():
        store = EtcdKVStore({"endpoints": [endpoint], "timeout": 60, "connect_timeout": 30},
                            tmp)
        await store.open()
        return store
    stores = []
    for _ in range(0, share, 50):  # connect in steps: 250 at once overwhelm a busy box
        stores += await asyncio.gather(*(make() for _ in range(min(50, share - len(stores)))))
    nodes = [SimulatedNode(st, f"sim{first + k}", f"10.250.{(first + k) // 250}."
                           f"{(first + k) % 250 + 1}", f"10.{100 + (first + k) // 200}."
                           f"{(first + k) % 200}.0/24", lease_ttl=60)
             for k, st in enumerate(stores)]
    for at in range(0, share, 50):
        await asyncio.gather(*(n.start() for n in nodes[at:at + 50]))
        if GC_POLICY == "agent":
            gc.freeze()  # these agents' start-up state, as each agent freezes its own
    while not all(len(n.registry.nodes) == total - 1 for n in nodes):
        await asyncio.sleep(0.05)
    print("joined", flush=True)
    await lines.get()  # go
    _settle()
    cpu = time.process_time()
    owned = {}
    for i in range(CHANGES):
        index = i % total
        if first <= index < first + share:
            nodes[index - first].ipcache.set_local(_endpoint_ip(i, total), 2000 + i % 500)
        owned[index] = owned.get(index, 0) + 1
    expected = [CHANGES - owned.get(first + k, 0) for k in range(share)]
    while not all(len(n.ipcache.installed) == want for n, want in zip(nodes, expected, strict=True)):
        await asyncio.sleep(0.01)
    print(f"converged {time.time()} {time.process_time() - cpu}", flush=True)
    await lines.get()  # stop
    for at in range(0, share, 50):
        await asyncio.gather(*(n.stop() for n in nodes[at:at + 50]))
    await asyncio.gather(*(st.close() for st in stores))


async def scale_converge_processes(server: EtcdServer, count: int, processes: int,
                                   tmp: Path) -> dict[str, float]:
    """`count` simulated nodes spread over `processes` worker processes (see `worker`),
    one etcd; the same CHANGES endpoint changes; time until every node of every process
    holds every other node's endpoints."""
    store = await etcd_factory(server, tmp)()
    await _wipe(store)
    await store.close()
    per = -(-count // processes)
    began = time.perf_counter()
    procs = []
    done = False
    for first in range(0, count, per):
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", server.endpoint, str(first),
            str(min(per, count - first)), str(count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
    try:
        for proc in procs:
            line = (await proc.stdout.readline()).decode().split()
            if line[:1] != ["joined"]:
                raise RuntimeError(f"a worker failed to join: {line}")
        joined = time.perf_counter() - began
        etcd_cpu = _cpu_seconds(server.process.pid)
        start = time.time()
        for proc in procs:
            proc.stdin.write(b"go\n")
        await asyncio.gather(*(proc.stdin.drain() for proc in procs))
        finished, cpu = [], 0.0
        for proc in procs:
            line = (await proc.stdout.readline()).decode().split()
            if line[:1] != ["converged"]:
                raise RuntimeError(f"a worker failed to converge: {line}")
            finished.append(float(line[1]))
            cpu += float(line[2])
        done = True
        converged = max(finished) - start
        etcd_cpu = _cpu_seconds(server.process.pid) - etcd_cpu
        return {"joined": joined, "converged": converged, "etcd_cpu": etcd_cpu,
                "agent_cpu": cpu, "processes": len(procs), "load": os.getloadavg()[0]}
    finally:
        for proc in procs:  # a clean stop once every worker converged; else no waiting
            if proc.returncode is None:
                if done:
                    try:
                        proc.stdin.write(b"stop\n")
                        await proc.stdin.drain()
                    except (BrokenPipeError, ConnectionResetError):
                        proc.kill()
                else:
                    proc.kill()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        endpoint_, first_, share_, total_ = sys.argv[2:6]
        asyncio.run(worker(endpoint_, int(first_), int(share_), int(total_)))
    else:
        asyncio.run(main())
