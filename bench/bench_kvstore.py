"""KV-store throughput and watch latency: the embedded SQLite store vs a local etcd.

A single-node user would otherwise run etcd next to the agent (Cilium's default store), so
the baseline is Debian's etcd 3.4 on loopback (fresh data dir) through the etcd plugin.
Measured, each on a fresh store:
- create-if-absent (an identity allocation's write) per second, one task at a time and
  with 16 concurrent tasks;
- compare-and-swap updates per second on one hot key by 16 concurrent tasks (successful
  swaps / s: the contended-counter case);
- watch latency: put → event delivered to a watcher on another connection (median); for
  the embedded store also with the writer in another process (found by polling).
Goal: the embedded store is no slower than local etcd for single-node work."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from pylium.kvstore.embedded import EmbeddedKVStore  # noqa: E402
from pylium.kvstore.testing import EtcdServer  # noqa: E402
from pylium_kvstore_etcd.backend import EtcdKVStore  # noqa: E402

CREATES = 2000
CONCURRENCY = 16
CAS_SECONDS = 3.0
WATCH_SAMPLES = 200


async def creates_per_second(factory, concurrency: int) -> float:
    async with factory() as kv:
        per_task = CREATES // concurrency

        async def worker(t: int) -> None:
            for i in range(per_task):
                assert await kv.create(f"bench/ids/{t}/{i}", b'{"labels": "k8s:app=x"}')
        began = time.perf_counter()
        await asyncio.gather(*(worker(t) for t in range(concurrency)))
        return per_task * concurrency / (time.perf_counter() - began)


async def cas_per_second(factory) -> float:
    async with factory() as kv:
        await kv.put("bench/counter", b"0")
        wins = 0
        deadline = time.perf_counter() + CAS_SECONDS

        async def worker() -> None:
            nonlocal wins
            while time.perf_counter() < deadline:
                item = await kv.get("bench/counter")
                if await kv.compare_and_swap("bench/counter", item.mod_revision,
                                             b"%d" % (int(item.value) + 1)):
                    wins += 1
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - began
        final = int((await kv.get("bench/counter")).value)
        assert final == wins, f"lost updates: counter {final} != {wins} successful swaps"
        return wins / elapsed


async def watch_latency_ms(factory) -> float:
    async with factory() as writer, factory() as watcher:
        watch = watcher.watch("bench/w/", after_revision=await writer.revision())
        samples = []
        for i in range(WATCH_SAMPLES):
            began = time.perf_counter()
            await writer.put(f"bench/w/{i}", b"x")
            event = await asyncio.wait_for(anext(watch), 10)
            samples.append((time.perf_counter() - began) * 1000)
            assert event.key == f"bench/w/{i}"
        await watch.aclose()
        return statistics.median(samples)


def _timestamped_writer(state_dir: str, count: int) -> None:
    """Child process: writes `count` keys whose values are the perf_counter at write time
    (CLOCK_MONOTONIC, comparable across processes on Linux), 20 ms apart."""
    async def body():
        async with EmbeddedKVStore({}, Path(state_dir)) as kv:
            for i in range(count):
                await kv.put(f"bench/x/{i}", repr(time.perf_counter()).encode())
                await asyncio.sleep(0.02)
    asyncio.run(body())


async def cross_process_latency_ms(state_dir: str) -> float:
    """Embedded only: watcher here, writer in another process (the polling path)."""
    import multiprocessing

    async with EmbeddedKVStore({}, Path(state_dir)) as kv:
        watch = kv.watch("bench/x/", after_revision=await kv.revision())
        proc = multiprocessing.get_context("spawn").Process(
            target=_timestamped_writer, args=(state_dir, WATCH_SAMPLES // 2))
        proc.start()
        samples = []
        for _ in range(WATCH_SAMPLES // 2):
            event = await asyncio.wait_for(anext(watch), 30)
            samples.append((time.perf_counter() - float(event.value)) * 1000)
        await watch.aclose()
        await asyncio.to_thread(proc.join, 30)
        return statistics.median(samples)


def measure(make_factory) -> dict[str, float]:
    results = {}
    for name, probe in (
        ("creates_1", lambda f: creates_per_second(f, 1)),
        ("creates_16", lambda f: creates_per_second(f, CONCURRENCY)),
        ("cas_16", cas_per_second),
        ("watch_ms", watch_latency_ms),
    ):
        with make_factory() as factory:
            results[name] = asyncio.run(probe(factory))
    return results


class EmbeddedFactory:
    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="pylium-bench-kv-")
        return lambda: EmbeddedKVStore({}, Path(self.tmp.name))

    def __exit__(self, *exc):
        self.tmp.cleanup()


class EtcdFactory:
    def __enter__(self):
        self.server = EtcdServer().__enter__()
        return lambda: EtcdKVStore({"endpoints": [self.server.endpoint]}, Path("/tmp"))

    def __exit__(self, *exc):
        self.server.__exit__(*exc)


def main() -> None:
    embedded = measure(EmbeddedFactory)
    etcd = measure(EtcdFactory)
    baseline = "etcd 3.4 on loopback (etcd plugin)"
    report("kvstore", "create_if_absent_sequential", "ops/s", embedded["creates_1"],
           etcd["creates_1"], baseline, "higher is better; >= 1x",
           met=embedded["creates_1"] >= etcd["creates_1"])
    report("kvstore", f"create_if_absent_{CONCURRENCY}_tasks", "ops/s",
           embedded["creates_16"], etcd["creates_16"], baseline, "higher is better; >= 1x",
           met=embedded["creates_16"] >= etcd["creates_16"])
    report("kvstore", f"cas_hot_key_{CONCURRENCY}_tasks", "successful swaps/s",
           embedded["cas_16"], etcd["cas_16"], baseline, "higher is better; >= 1x",
           met=embedded["cas_16"] >= etcd["cas_16"])
    report("kvstore", "watch_latency_median", "ms", embedded["watch_ms"], etcd["watch_ms"],
           baseline, "lower is better; <= 1x", met=embedded["watch_ms"] <= etcd["watch_ms"])
    with EmbeddedFactory() as factory:
        state_dir = str(factory().state_dir)
        cross = asyncio.run(cross_process_latency_ms(state_dir))
    report("kvstore", "watch_latency_median_other_process_writer", "ms", cross,
           etcd["watch_ms"], baseline,
           "lower is better; <= 1x (embedded polls other processes' commits every 20 ms)",
           met=cross <= etcd["watch_ms"])


if __name__ == "__main__":
    main()
