"""The embedded KV store: one SQLite file on this node's disk, no server.

Semantics follow etcd (see `pylium.api.kvstore`): one store-wide revision (1 in a new store,
as in etcd) bumped once per write transaction, per-key create/mod revisions, an event log that lets watches resume after a
revision, and leases whose expiry deletes their keys.

Safety: the database runs in WAL mode with a busy timeout, and every write is one
`BEGIN IMMEDIATE` transaction (read-check-write under SQLite's write lock), so create and
compare-and-swap stay atomic even when several processes open the same file. Watchers in this
process (of any store open on the same file) are woken right after each write; changes made
by other processes are noticed by polling `PRAGMA data_version` every `poll_interval`
seconds, as long as another process has the file open: each open store holds a lock on
a byte of its own of `<path>.users` (an open-file-description lock at a random offset)
from before it first touches the database, so a store that finds no lock but its own
knows nobody else can have committed and skips the query (a thread hop and an SQLite call
fifty times a second: the largest share of an idle agent's CPU). Expired leases are reaped before
every operation and by a background sweeper, so watchers see the delete events even when
nobody touches the store.

Options (all optional):
  `path`            database file (default `<state_dir>/kvstore.sqlite3`)
  `poll_interval`   seconds between cross-process change checks while a watch is
                    active (default 0.02)
  `sweep_interval`  seconds between lease-expiry sweeps (default 0.25)
  `history`         revisions of event log kept for resuming watches (default 100000)
  `busy_timeout`    seconds a write waits for another process's lock (default 30)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pylium.api.kvstore import (
    KVEvent,
    KVItem,
    KVStore,
    KVStoreCompacted,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)
from pylium.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1), ('compact_revision', 0);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    type TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_revision ON events (revision);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at);
"""

#: events fetched per watcher query; a watcher loops until it has caught up
WATCH_BATCH = 1000
#: compact the event log every this many revisions
COMPACT_EVERY = 1000
#: keys per DELETE statement of `delete_many` (SQLite's bound-parameter limit is 999 on
#: older builds)
DELETE_CHUNK = 500

#: open stores per database file in this process, so a write wakes the watchers of every
#: store on that file at once (other processes are noticed by polling)
_OPEN_STORES: dict[Path, weakref.WeakSet] = {}
_OPEN_STORES_LOCK = threading.Lock()


def prefix_range(prefix: str) -> tuple[bytes, bytes | None]:
    """`[start, end)` in byte order covering every key that starts with `prefix`
    (end None: no upper bound)."""
    start = prefix.encode()
    end = bytearray(start)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return start, None
    end[-1] += 1
    return start, bytes(end)


class _Watch:
    """One running watch: its key range, how far it has read the log, and the events a
    write of this process handed it directly."""

    __slots__ = ("start", "end", "wakeup", "pos", "pending", "dirty", "caught_up")

    def __init__(self, start: bytes, end: bytes | None, pos: int):
        self.start, self.end, self.pos = start, end, pos
        self.wakeup = asyncio.Event()
        #: (seq, revision, type, key, value) to yield without reading the log
        self.pending: list[tuple[int, int, str, bytes, bytes]] = []
        #: the log may hold events past `pos` it has not seen: read it
        self.dirty = True
        #: not reading the log: has seen (or holds in `pending`) every event up to `pos`
        self.caught_up = False

    def covers(self, key: bytes) -> bool:
        return self.start <= key and (self.end is None or key < self.end)


class _Txn:
    """One write transaction: bumps the store revision at most once, on the first change."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self._revision = 0
        #: its events as logged: (seq, revision, type, key, value), seq ascending
        self.events: list[tuple[int, int, str, bytes, bytes]] = []

    @property
    def revision(self) -> int:
        if not self._revision:
            (self._revision,) = self.conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
            ).fetchone()
        return self._revision

    @property
    def changed(self) -> bool:
        return bool(self._revision)

    def event(self, kind: str, key: bytes, value: bytes) -> None:
        revision = self.revision
        seq = self.conn.execute(
            "INSERT INTO events (revision, type, key, value) VALUES (?, ?, ?, ?)",
            (revision, kind, key, value),
        ).lastrowid
        self.events.append((seq, revision, kind, key, value))

    def delete_keys(self, where: str, params: tuple) -> int:
        rows = self.conn.execute(
            f"DELETE FROM kv WHERE {where} RETURNING key", params
        ).fetchall()
        for (key,) in sorted(rows):
            self.event("delete", key, b"")
        return len(rows)


def _options(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"kvstore option {name!r} must be a positive number, got {value!r}")
    return float(value)


class EmbeddedKVStore(KVStore):
    """SQLite-backed KV store for one node (several processes may share the file)."""

    name = "embedded"

    def __init__(self, options: Mapping[str, Any], state_dir: Path):
        super().__init__(options, state_dir)
        path = self.options.get("path")
        self.path = Path(path) if path else self.state_dir / "kvstore.sqlite3"
        self.poll_interval = _options(self.options, "poll_interval", 0.02)
        self.sweep_interval = _options(self.options, "sweep_interval", 0.25)
        self.history = int(_options(self.options, "history", 100_000))
        self.busy_timeout = _options(self.options, "busy_timeout", 30.0)
        unknown = set(self.options) - {"path", "poll_interval", "sweep_interval", "history",
                                       "busy_timeout"}
        if unknown:
            raise ConfigError(f"unknown embedded kvstore option(s): {', '.join(sorted(unknown))}")
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._background: asyncio.Task | None = None
        #: each running watch
        self._watchers: dict[object, _Watch] = {}
        self._closed = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active_watches = 0
        self._key = self.path.absolute()
        #: `<path>.users`, where this store holds a lock on byte `_users_slot` while open
        #: (see the module docstring); -1: none
        self._users_fd = -1
        self._users_slot = secrets.randbelow(1 << 62) + 1

    # plumbing ----------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed or self._executor is None:
            raise KVStoreUnavailable(f"embedded kvstore {self.path} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except (sqlite3.OperationalError, sqlite3.ProgrammingError) as exc:
            # "database is locked" past the busy timeout, disk full, closed meanwhile...
            raise KVStoreUnavailable(f"embedded kvstore {self.path}: {exc}") from None

    def _wake_watchers(self, events: list[tuple] | None = None) -> None:
        """Tell the watches whose prefix holds a key of `events` (one committed transaction
        of this process, seq ascending; None: something changed, read the log). A pod
        start changes a key or two: the watches of other prefixes (nodes, services...)
        stay asleep instead of each querying the log for nothing.

        A watch that is not reading the log, caught up to the event just before this transaction's first,
        is handed the events as they were written: nothing can be between, so it need not
        read them back from the log (a thread hop and a query per write). Any other watch
        of those keys reads the log as before."""
        for watch in self._watchers.values():
            if events is None:
                watch.dirty = True
                watch.wakeup.set()
                continue
            covers = watch.covers
            matching = [event for event in events if covers(event[3])]
            if (watch.caught_up and not watch.dirty and events[0][0] == watch.pos + 1
                    and len(watch.pending) < WATCH_BATCH):  # (a consumer that lags reads)
                watch.pos = events[-1][0]
                if matching:
                    watch.pending += matching
                    watch.wakeup.set()
            elif matching:
                watch.dirty = True
                watch.wakeup.set()

    def _changed(self, events: list[tuple]) -> None:
        """This store committed `events`: hand them to its watchers of their keys and to
        those of every other store open on the same file in this process (they may run on
        other threads' loops). Other processes' changes wake every watch (`data_version`)."""
        self._wake_watchers(events)
        with _OPEN_STORES_LOCK:
            peers = [s for s in _OPEN_STORES.get(self._key, ()) if s is not self]
        for peer in peers:
            loop = peer._loop
            if peer._closed or loop is None or loop.is_closed():
                continue
            try:
                loop.call_soon_threadsafe(peer._wake_watchers, events)
            except RuntimeError:  # that loop closed meanwhile
                pass

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # announce this process before it can commit anything (see `_others_may_write`)
        self._users_fd = os.open(f"{self.path}.users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                 0o600)
        fcntl.fcntl(self._users_fd, fcntl.F_OFD_SETLK,
                    _flock(fcntl.F_RDLCK, self._users_slot, 1))
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        self._conn = conn

    def _write(self, fn: Callable[[_Txn], T]) -> tuple[T, list[tuple]]:
        """Run `fn` in one IMMEDIATE transaction after reaping expired leases.
        Returns fn's result and the events it logged (none: nothing changed)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            txn = _Txn(conn)
            self._reap(txn)
            result = fn(txn)
            if txn.changed and txn.revision % min(COMPACT_EVERY, self.history) == 0:
                self._compact(txn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result, txn.events

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[T, list[tuple]]:
        """Reap expired leases first (so a read never sees a dead lease's keys), then read."""
        changed: list[tuple] = []
        if self._conn.execute("SELECT 1 FROM leases WHERE expires_at < ? LIMIT 1",
                              (time.time(),)).fetchone():
            _, changed = self._write(lambda txn: None)
        return fn(self._conn), changed

    def _reap(self, txn: _Txn) -> None:
        expired = txn.conn.execute(
            "DELETE FROM leases WHERE expires_at < ? RETURNING id", (time.time(),)
        ).fetchall()
        for (lease_id,) in sorted(expired):
            txn.delete_keys("lease = ?", (lease_id,))

    def _compact(self, txn: _Txn) -> None:
        floor = txn.revision - self.history
        if floor > 0:
            txn.conn.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            txn.conn.execute(
                "UPDATE meta SET value = MAX(value, ?) WHERE name = 'compact_revision'", (floor,))

    @staticmethod
    def _check_lease(txn: _Txn, lease: Lease | None) -> int:
        if lease is None:
            return 0
        if txn.conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease.id,)).fetchone() is None:
            raise LeaseNotFound(f"lease {lease.id:x} expired or was revoked")
        return lease.id

    @staticmethod
    def _upsert(txn: _Txn, key: bytes, value: bytes, lease_id: int, existing) -> int:
        revision = txn.revision
        create_revision = existing[0] if existing else revision
        txn.conn.execute(
            "INSERT OR REPLACE INTO kv (key, value, create_revision, mod_revision, lease) "
            "VALUES (?, ?, ?, ?, ?)", (key, value, create_revision, revision, lease_id))
        txn.event("put", key, value)
        return revision

    async def _mutate(self, fn: Callable[[_Txn], T]) -> T:
        result, changed = await self._run(lambda: self._write(fn))
        if changed:
            self._changed(changed)
        return result

    async def _query(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result, changed = await self._run(lambda: self._read(fn))
        if changed:
            self._changed(changed)
        return result

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        if not self._closed:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pylium-kvstore")
        self._closed = False
        try:
            await self._run(self._connect)
        except (sqlite3.Error, OSError, KVStoreUnavailable) as exc:
            await self.close()
            reason = str(exc).removeprefix(f"embedded kvstore {self.path}: ")
            raise KVStoreUnavailable(
                f"cannot open embedded kvstore {self.path}: {reason}") from None
        self._loop = asyncio.get_running_loop()
        with _OPEN_STORES_LOCK:
            _OPEN_STORES.setdefault(self._key, weakref.WeakSet()).add(self)
        self._background = self._loop.create_task(self._watch_for_changes())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _OPEN_STORES_LOCK:
            peers = _OPEN_STORES.get(self._key)
            if peers is not None:
                peers.discard(self)
                if not peers:
                    del _OPEN_STORES[self._key]
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
            self._background = None
        self._wake_watchers()
        executor, self._executor = self._executor, None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)
        if self._users_fd >= 0:
            os.close(self._users_fd)  # (and its lock)
            self._users_fd = -1

    def _others_may_write(self) -> bool:
        """Whether another store (of this or another process) has the file open: a lock on
        `<path>.users` outside this store's byte. Two queries, no lock taken or dropped."""
        fd, slot = self._users_fd, self._users_slot
        if fd < 0:
            return True
        for start, length in ((0, slot), (slot + 1, 0)):  # length 0: to the end of offsets
            found = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
            if struct.unpack(_FLOCK, found)[0] != fcntl.F_UNLCK:
                return True
        return False

    async def _watch_for_changes(self) -> None:
        """Wake watchers when another process commits; reap expired leases."""
        data_version = None
        next_sweep = 0.0
        while True:
            try:
                # alone on the file: nobody else committed, `data_version` is unchanged
                # (it counts other connections' commits only); the value kept is compared
                # once others are there, so their commits since then are not missed
                if data_version is None or self._others_may_write():
                    version = await self._run(
                        lambda: self._conn.execute("PRAGMA data_version").fetchone()[0])
                    if data_version is not None and version != data_version:
                        self._wake_watchers()
                    data_version = version
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval
                    await self._query(lambda conn: None)
            except asyncio.CancelledError:
                raise
            except KVStoreUnavailable:
                return
            except Exception:
                log.exception("embedded kvstore background check failed")
            # poll fast only while someone watches: idle stores just sweep leases
            await asyncio.sleep(self.poll_interval if self._active_watches
                                else min(self.sweep_interval, 1.0))

    # reads -------------------------------------------------------------------------------
    async def get(self, key: str) -> KVItem | None:
        def read(conn: sqlite3.Connection) -> KVItem | None:
            row = conn.execute(
                "SELECT key, value, mod_revision, create_revision, lease FROM kv WHERE key = ?",
                (key.encode(),)).fetchone()
            return _item(row) if row else None
        return await self._query(read)

    async def list(self, prefix: str) -> list[KVItem]:
        start, end = prefix_range(prefix)

        def read(conn: sqlite3.Connection) -> list[KVItem]:
            sql = ("SELECT key, value, mod_revision, create_revision, lease FROM kv "
                   "WHERE key >= ?")
            params: tuple = (start,)
            if end is not None:
                sql += " AND key < ?"
                params += (end,)
            return [_item(row) for row in conn.execute(sql + " ORDER BY key", params)]
        return await self._query(read)

    async def revision(self) -> int:
        return await self._query(_current_revision)

    # writes ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        raw_key, value = key.encode(), bytes(value)

        def write(txn: _Txn) -> int:
            lease_id = self._check_lease(txn, lease)
            existing = txn.conn.execute(
                "SELECT create_revision FROM kv WHERE key = ?", (raw_key,)).fetchone()
            return self._upsert(txn, raw_key, value, lease_id, existing)
        return await self._mutate(write)

    async def put_many(self, items: list[tuple[str, bytes]], lease: Lease | None = None) -> int:
        """One transaction (one revision, one wake-up of the watchers) for all of them."""
        if not items:
            return 0
        encoded = [(key.encode(), bytes(value)) for key, value in items]

        def write(txn: _Txn) -> int:
            lease_id = self._check_lease(txn, lease)
            revision = 0
            for raw_key, value in encoded:
                existing = txn.conn.execute(
                    "SELECT create_revision FROM kv WHERE key = ?", (raw_key,)).fetchone()
                revision = self._upsert(txn, raw_key, value, lease_id, existing)
            return revision
        return await self._mutate(write)

    async def delete_many(self, keys: list[str]) -> int:
        """One transaction for all of them (see `put_many`)."""
        if not keys:
            return 0
        raw_keys = [key.encode() for key in keys]

        def write(txn: _Txn) -> int:
            deleted = 0
            for i in range(0, len(raw_keys), DELETE_CHUNK):
                chunk = tuple(raw_keys[i:i + DELETE_CHUNK])
                deleted += txn.delete_keys(f"key IN ({','.join('?' * len(chunk))})", chunk)
            return deleted
        return await self._mutate(write)

    async def delete(self, key: str) -> bool:
        raw_key = key.encode()
        return await self._mutate(lambda txn: txn.delete_keys("key = ?", (raw_key,)) > 0)

    async def delete_prefix(self, prefix: str) -> int:
        start, end = prefix_range(prefix)
        if end is None:
            return await self._mutate(lambda txn: txn.delete_keys("key >= ?", (start,)))
        return await self._mutate(
            lambda txn: txn.delete_keys("key >= ? AND key < ?", (start, end)))

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        return await self.compare_and_swap(key, 0, value, lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: Lease | None = None
    ) -> bool:
        raw_key, value = key.encode(), bytes(value)

        def write(txn: _Txn) -> bool:
            existing = txn.conn.execute(
                "SELECT create_revision, mod_revision FROM kv WHERE key = ?", (raw_key,)
            ).fetchone()
            current = existing[1] if existing else 0
            if current != expected_mod_revision:
                return False
            lease_id = self._check_lease(txn, lease)
            self._upsert(txn, raw_key, value, lease_id, existing)
            return True
        return await self._mutate(write)

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        raw_key = key.encode()
        if expected_mod_revision <= 0:
            return False
        return await self._mutate(lambda txn: txn.delete_keys(
            "key = ? AND mod_revision = ?", (raw_key, expected_mod_revision)) > 0)

    # watches -----------------------------------------------------------------------------
    async def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        start, end = prefix_range(prefix)
        key_filter = "key >= ?" + (" AND key < ?" if end is not None else "")
        key_params: tuple = (start,) if end is None else (start, end)

        def first_seq(conn: sqlite3.Connection) -> tuple[int, int]:
            revision = after_revision or _current_revision(conn)
            (compacted,) = conn.execute(
                "SELECT value FROM meta WHERE name = 'compact_revision'").fetchone()
            if revision < compacted:
                raise KVStoreCompacted(
                    f"cannot resume watch of {prefix!r} after revision {revision}: "
                    f"history before {compacted + 1} was compacted")
            # position after the last event at or below `revision`; if compaction removed
            # them all, every event still kept is above `revision`: start before the first
            (seq,) = conn.execute(
                "SELECT COALESCE((SELECT MAX(seq) FROM events WHERE revision <= ?),"
                " (SELECT MIN(seq) - 1 FROM events), 0)", (revision,)).fetchone()
            return seq, revision

        def fetch(conn: sqlite3.Connection, after_seq: int) -> tuple[list, int]:
            # read the log's end first: events committed meanwhile are fetched next round
            first, end_seq = conn.execute(
                "SELECT MIN(seq), COALESCE(MAX(seq), 0) FROM events").fetchone()
            if first is not None and first > after_seq + 1:
                raise KVStoreCompacted(
                    f"watch of {prefix!r} fell behind: events it had not read yet were "
                    "compacted")
            rows = conn.execute(
                f"SELECT seq, revision, type, key, value FROM events WHERE seq > ? AND "
                f"seq <= ? AND {key_filter} ORDER BY seq LIMIT {WATCH_BATCH}",
                (after_seq, end_seq, *key_params)).fetchall()
            return rows, end_seq

        last_seq, _ = await self._query(first_seq)
        self._active_watches += 1
        token = object()
        watch = self._watchers[token] = _Watch(start, end, last_seq)
        try:
            while True:
                if self._closed:
                    raise KVStoreUnavailable(f"embedded kvstore {self.path} was closed")
                if watch.dirty:
                    # (a change committed from here on sets `dirty` again: read next round)
                    watch.dirty = watch.caught_up = False
                    rows, end_seq = await self._query(
                        functools.partial(fetch, after_seq=watch.pos))
                    for seq, revision, kind, key, value in rows:
                        watch.pos = seq
                        yield KVEvent(type=kind, key=key.decode(), value=bytes(value),
                                      revision=revision)
                    if len(rows) == WATCH_BATCH:
                        watch.dirty = True
                        continue
                    watch.pos = max(watch.pos, end_seq)
                    watch.caught_up = True
                if not watch.dirty and not watch.pending:
                    watch.wakeup.clear()
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                    # cancellation that races with the wake-up, leaving the consumer's
                    # task looping forever
                    try:
                        async with asyncio.timeout(1.0):
                            await watch.wakeup.wait()
                    except TimeoutError:
                        watch.dirty = True
                if watch.pending:  # handed over by a write of this process
                    pending, watch.pending = watch.pending, []
                    for _seq, revision, kind, key, value in pending:
                        yield KVEvent(type=kind, key=key.decode(), value=value,
                                      revision=revision)
        finally:
            del self._watchers[token]
            self._active_watches -= 1

    # leases ------------------------------------------------------------------------------
    async def grant_lease(self, ttl: float) -> Lease:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        lease_id = secrets.randbits(62) or 1

        def write(txn: _Txn) -> None:
            txn.conn.execute("INSERT INTO leases (id, ttl, expires_at) VALUES (?, ?, ?)",
                             (lease_id, float(ttl), time.time() + ttl))
        await self._mutate(write)
        return Lease(id=lease_id, ttl=float(ttl))

    async def keepalive(self, lease: Lease) -> bool:
        def write(txn: _Txn) -> bool:
            updated = txn.conn.execute(
                "UPDATE leases SET expires_at = ? + ttl WHERE id = ? RETURNING id",
                (time.time(), lease.id)).fetchone()
            return updated is not None
        return await self._mutate(write)

    async def revoke_lease(self, lease: Lease) -> None:
        def write(txn: _Txn) -> None:
            txn.conn.execute("DELETE FROM leases WHERE id = ?", (lease.id,))
            txn.delete_keys("lease = ?", (lease.id,))
        await self._mutate(write)

    # health ------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            revision, keys, leases = await self._query(lambda conn: (
                _current_revision(conn),
                conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0],
                conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0]))
        except (KVStoreUnavailable, sqlite3.Error) as exc:
            return {"backend": self.name, "healthy": False, "revision": 0,
                    "detail": f"{self.path}: {exc}"}
        return {"backend": self.name, "healthy": True, "revision": revision,
                "detail": f"sqlite {self.path} ({keys} keys, {leases} leases)",
                "keys": keys, "leases": leases}


#: struct flock (l_type, l_whence, l_start, l_len, l_pid) as Linux lays it out
_FLOCK = "@hhqqi4x"


def _flock(kind: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


def _current_revision(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]


def _item(row) -> KVItem:
    key, value, mod_revision, create_revision, lease = row
    return KVItem(key=key.decode(), value=bytes(value), mod_revision=mod_revision,
                  create_revision=create_revision, lease=lease)
