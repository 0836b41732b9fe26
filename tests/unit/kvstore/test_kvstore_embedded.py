"""The embedded SQLite store: the shared conformance suite plus what only it promises
(several processes on one file, crash-safe leases, compaction, option checking)."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest
from pylium.api.kvstore import KVStoreCompacted, KVStoreUnavailable
from pylium.errors import ConfigError
from pylium.kvstore.conformance import KVStoreConformance, next_events, run
from pylium.kvstore.embedded import EmbeddedKVStore, prefix_range

FAST = {"poll_interval": 0.02, "sweep_interval": 0.1}


class TestEmbeddedConformance(KVStoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path):
        return lambda: EmbeddedKVStore(FAST, tmp_path / "state")


def _race_creates(state_dir: str, worker: int, keys: int, queue) -> None:
    async def body():
        async with EmbeddedKVStore(FAST, Path(state_dir)) as kv:
            won = [k for k in range(keys) if await kv.create(f"ids/{k}", f"{worker}".encode())]
            counter_wins = 0
            for _ in range(20):
                item = await kv.get("counter")
                value = int(item.value) + 1
                if await kv.compare_and_swap("counter", item.mod_revision, b"%d" % value):
                    counter_wins += 1
            queue.put((worker, won, counter_wins))
    asyncio.run(body())


def test_processes_sharing_one_file_never_both_win(tmp_path):
    """Four processes race create-if-absent on 40 keys and CAS-increment one counter:
    each key has exactly one creator, and no increment is lost."""
    state = tmp_path / "state"

    async def init():
        async with EmbeddedKVStore(FAST, state) as kv:
            await kv.put("counter", b"0")
    run(init())
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race_creates, args=(str(state), w, 40, queue))
             for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    owners: dict[int, int] = {}
    for worker, won, _ in results:
        for key in won:
            assert key not in owners, f"key {key} created by {owners[key]} and {worker}"
            owners[key] = worker
    assert sorted(owners) == list(range(40))
    total_increments = sum(wins for _, _, wins in results)

    async def check():
        async with EmbeddedKVStore(FAST, state) as kv:
            for key, worker in owners.items():
                assert (await kv.get(f"ids/{key}")).value == f"{worker}".encode()
            assert int((await kv.get("counter")).value) == total_increments > 0
    run(check())


def _write_keys(state_dir: str, count: int) -> None:
    async def body():
        async with EmbeddedKVStore(FAST, Path(state_dir)) as kv:
            for i in range(count):
                await kv.put(f"xproc/{i}", b"%d" % i)
            await kv.delete("xproc/0")
    asyncio.run(body())


def test_watch_sees_writes_of_another_process(tmp_path):
    """No in-process wake-up can help here: the watcher notices the other process's commits
    by polling, and still gets every event in order."""
    state = tmp_path / "state"

    async def body():
        async with EmbeddedKVStore(FAST, state) as kv:
            watch = kv.watch("xproc/", after_revision=await kv.revision())
            proc = multiprocessing.get_context("spawn").Process(
                target=_write_keys, args=(str(state), 20))
            proc.start()
            events = await next_events(watch, 21, timeout=30)
            await asyncio.to_thread(proc.join, 30)
            await watch.aclose()
            assert proc.exitcode == 0
            assert [(e.type, e.key) for e in events] == (
                [("put", f"xproc/{i}") for i in range(20)] + [("delete", "xproc/0")])
    run(body())


def test_lease_of_a_crashed_writer_expires_for_others(tmp_path):
    """A writer that vanishes without revoking its lease: another store on the same file
    reaps the lease on its own (background sweep) and its watcher sees the deletes."""
    state = tmp_path / "state"

    async def body():
        observer = EmbeddedKVStore(FAST, state)
        await observer.open()
        writer = EmbeddedKVStore(FAST, state)
        await writer.open()
        lease = await writer.grant_lease(1.0)
        await writer.put("nodes/a", b"a", lease=lease)
        await writer.close()  # no revoke: like a killed agent
        start = await observer.revision()
        watch = observer.watch("nodes/", after_revision=start)
        (event,) = await next_events(watch, 1, timeout=6)
        assert (event.type, event.key) == ("delete", "nodes/a")
        assert await observer.get("nodes/a") is None
        await watch.aclose()
        await observer.close()
    run(body())


def test_watch_behind_compacted_history_is_told_so(tmp_path):
    async def body():
        async with EmbeddedKVStore({**FAST, "history": 10}, tmp_path) as kv:
            first = await kv.put("k", b"0")
            for i in range(40):
                await kv.put("k", f"{i}".encode())
            last = await kv.revision()
            with pytest.raises(KVStoreCompacted, match="compacted"):
                await anext(kv.watch("k", after_revision=first))
            watch = kv.watch("k", after_revision=last - 3)
            events = await next_events(watch, 3)
            await watch.aclose()
            assert [e.revision for e in events] == [last - 2, last - 1, last]
    run(body())


def test_watch_ends_with_an_error_when_the_store_closes(tmp_path):
    async def body():
        kv = EmbeddedKVStore(FAST, tmp_path)
        await kv.open()
        watch = kv.watch("x/")
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)
        await kv.close()
        with pytest.raises(Exception, match="closed"):
            await asyncio.wait_for(pending, 5)
    run(body())


def test_a_commit_wakes_only_the_watches_of_its_keys(tmp_path):
    """A change under one prefix wakes the watches of that prefix (at once, not at their
    1 s timeout) and leaves the others asleep: they query the log only when it holds
    something for them, also when the change comes from another store on the file in this
    process."""
    quiet = {"poll_interval": 60, "sweep_interval": 60}  # no polling: only wake-ups

    async def body():
        async with EmbeddedKVStore(quiet, tmp_path) as kv, \
                EmbeddedKVStore(quiet, tmp_path) as peer:
            fetches = _count_log_reads(kv)
            watch = kv.watch("a/", after_revision=await kv.revision())
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.1)  # asleep now, after its first fetch
            asleep = len(fetches)
            assert asleep >= 1
            for i in range(10):
                await kv.put(f"b/{i}", b"x")
                await peer.put(f"c/{i}", b"x")
            await asyncio.sleep(0.1)
            assert len(fetches) == asleep  # twenty changes elsewhere: not woken
            await peer.put("a/1", b"y")  # another store on the file, in this process
            assert (await asyncio.wait_for(first, 0.5)).key == "a/1"
            await kv.put("a/2", b"z")
            assert (await next_events(watch, 1, timeout=0.5))[0].key == "a/2"
            await watch.aclose()
    run(body())


def _count_log_reads(kv: EmbeddedKVStore) -> list:
    """The log reads of `kv`'s watches from now on (each a partial of the watch's
    `fetch`), listed as they run."""
    fetches: list = []
    query = kv._query

    async def counting(fn):
        if getattr(getattr(fn, "func", None), "__name__", "") == "fetch":
            fetches.append(fn)
        return await query(fn)

    kv._query = counting
    return fetches


def _put_one(state_dir: str, key: str) -> None:
    async def body():
        async with EmbeddedKVStore(FAST, Path(state_dir)) as kv:
            await kv.put(key, b"other process")
    asyncio.run(body())


def test_writes_of_this_process_reach_its_watches_without_reading_the_log(tmp_path):
    """A watch caught up with the log is handed this process's writes as committed (no
    thread hop and query per write, e.g. an agent's own ipcache records); a commit of
    another process in between makes it read the log again, in order, nothing lost."""
    state = tmp_path / "state"

    async def body():
        # no polling of `data_version` (it would read the log after the peer's write):
        # the other process's commit is found because the next write does not follow on
        quiet = {"poll_interval": 60, "sweep_interval": 60}
        async with EmbeddedKVStore(quiet, state) as kv, EmbeddedKVStore(FAST, state) as peer:
            fetches = _count_log_reads(kv)
            watch = kv.watch("a/", after_revision=await kv.revision())
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.1)  # asleep now, after its first fetch
            asleep = len(fetches)
            await kv.put("a/1", b"1")
            await kv.put_many([("a/2", b"2"), ("b/x", b"-"), ("a/3", b"3")])
            await peer.delete("a/1")  # another store on the file, in this process
            events = [await asyncio.wait_for(first, 0.5)] + await next_events(watch, 3, 0.5)
            assert [(e.type, e.key, e.value) for e in events] == [
                ("put", "a/1", b"1"), ("put", "a/2", b"2"), ("put", "a/3", b"3"),
                ("delete", "a/1", b"")]
            assert [e.revision for e in events] == sorted(e.revision for e in events)
            assert len(fetches) == asleep  # none of them read back from the log

            proc = multiprocessing.get_context("spawn").Process(
                target=_put_one, args=(str(state), "a/p"))
            proc.start()
            await asyncio.to_thread(proc.join, 30)
            assert proc.exitcode == 0
            await kv.put("a/4", b"4")  # right after the other process's commit
            events = await next_events(watch, 2, timeout=5)
            assert [(e.key, e.value) for e in events] == [("a/p", b"other process"),
                                                          ("a/4", b"4")]
            assert len(fetches) > asleep  # the log was read for the other process's
            await watch.aclose()
    run(body())


def _hold_open(state_dir: str, opened, release) -> None:
    async def body():
        async with EmbeddedKVStore(FAST, Path(state_dir)):
            opened.set()
            await asyncio.to_thread(release.wait, 30)
    asyncio.run(body())


def test_data_version_is_polled_only_while_others_have_the_file_open(tmp_path):
    """Alone on its file a store has nothing to poll for (nobody else can commit); another
    store, of this process or another, makes it poll again, and the other process's write
    reaches its watch."""
    state = tmp_path / "state"

    async def body():
        async with EmbeddedKVStore(FAST, state) as kv:
            polls = []
            kv._conn.set_trace_callback(
                lambda sql: polls.append(sql) if "data_version" in sql else None)
            watch = kv.watch("x/", after_revision=await kv.revision())
            first = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.1)  # (its first check reads the value to compare with)
            before = len(polls)
            await asyncio.sleep(0.3)
            assert not kv._others_may_write() and len(polls) == before
            async with EmbeddedKVStore(FAST, state) as peer:
                assert kv._others_may_write() and peer._others_may_write()
                await asyncio.sleep(0.2)
                assert len(polls) >= before + 3
            assert not kv._others_may_write()
            ctx = multiprocessing.get_context("spawn")
            opened, release = ctx.Event(), ctx.Event()
            proc = ctx.Process(target=_hold_open, args=(str(state), opened, release))
            proc.start()
            try:
                assert await asyncio.to_thread(opened.wait, 30)
                assert kv._others_may_write()
            finally:
                release.set()
                await asyncio.to_thread(proc.join, 30)
            assert proc.exitcode == 0 and not kv._others_may_write()
            proc = ctx.Process(target=_put_one, args=(str(state), "x/1"))
            proc.start()
            event = await asyncio.wait_for(first, 30)
            await asyncio.to_thread(proc.join, 30)
            assert (event.key, event.value) == ("x/1", b"other process")
            await watch.aclose()
    run(body())


def test_state_dir_is_created_and_status_names_the_file(tmp_path):
    async def body():
        state = tmp_path / "deep" / "state"
        async with EmbeddedKVStore({}, state) as kv:
            status = await kv.status()
            assert status["revision"] == 1 and status["keys"] == 0
            assert str(state / "kvstore.sqlite3") in status["detail"]
        assert (state / "kvstore.sqlite3").is_file()
    run(body())


def test_unusable_state_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = EmbeddedKVStore({}, blocker / "state")
    with pytest.raises(KVStoreUnavailable, match=r"^cannot open embedded kvstore .*not-a-dir"):
        run(store.open())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "kvstore.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(KVStoreUnavailable, match="not a database"):
        run(EmbeddedKVStore({}, garbage).open())


@pytest.mark.parametrize("options, field", [
    ({"poll_interval": 0}, "poll_interval"),
    ({"history": "lots"}, "history"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_options_are_config_errors(tmp_path, options, field):
    with pytest.raises(ConfigError, match=field):
        EmbeddedKVStore(options, tmp_path)


def test_prefix_range_covers_exactly_the_prefix():
    assert prefix_range("a/") == (b"a/", b"a0")
    assert prefix_range("") == (b"", None)
    assert prefix_range("\U0010ffff") == ("\U0010ffff".encode(), b"\xf4\x8f\xbf\xc0")
