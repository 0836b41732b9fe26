"""A KV store in one JSON file: every write rewrites the file atomically (write + rename).

Good for a demo or a test, not for load: O(size) per write, one node, one process (stores
opened on the same file inside one process share their state; two processes do not see each
other's writes). Change history is kept in memory since the file was opened, so a watch can
resume after any revision of this process's lifetime; older ones raise `KVStoreCompacted`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pylium.api import (
    KVEvent,
    KVItem,
    KVStore,
    KVStoreCompacted,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)

HISTORY_LIMIT = 10_000
REAP_INTERVAL = 0.2


class _Shared:
    """The state of one file, shared by every store opened on it in this process."""

    def __init__(self, path: Path):
        self.path = path
        self.items: dict[str, KVItem] = {}
        self.leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, expires at, epoch s)
        self.revision = 0
        self.next_lease = 1
        self.history: list[KVEvent] = []
        self.history_start = 0  # events with revision > this are all in `history`
        self.watchers: list[tuple[str, asyncio.Queue]] = []
        self.users = 0
        self.reaper: asyncio.Task | None = None
        if path.exists():
            data = json.loads(path.read_text())
            self.revision, self.next_lease = data["revision"], data["next_lease"]
            self.leases = {int(k): (v[0], v[1]) for k, v in data["leases"].items()}
            self.items = {
                k: KVItem(k, base64.b64decode(v["value"]), v["mod"], v["create"], v["lease"])
                for k, v in data["items"].items()}
        else:
            self.revision = 1  # like etcd: 0 stays free to mean "from now" in `watch`
            self.save()
        self.history_start = self.revision

    def save(self) -> None:
        data = {
            "revision": self.revision, "next_lease": self.next_lease,
            "leases": {str(k): list(v) for k, v in self.leases.items()},
            "items": {k: {"value": base64.b64encode(i.value).decode(), "mod": i.mod_revision,
                          "create": i.create_revision, "lease": i.lease}
                      for k, i in self.items.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def emit(self, event: KVEvent) -> None:
        self.history.append(event)
        if len(self.history) > HISTORY_LIMIT:
            dropped = self.history[: len(self.history) - HISTORY_LIMIT]
            del self.history[: len(dropped)]
            self.history_start = dropped[-1].revision
        for prefix, queue in self.watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    def write(self, key: str, value: bytes, lease: Lease | None) -> int:
        if lease is not None and lease.id not in self.leases:
            raise LeaseNotFound(f"lease {lease.id} expired or was revoked")
        self.revision += 1
        old = self.items.get(key)
        self.items[key] = KVItem(key, bytes(value), self.revision,
                                 old.create_revision if old else self.revision,
                                 lease.id if lease else 0)
        self.save()
        self.emit(KVEvent("put", key, bytes(value), self.revision))
        return self.revision

    def remove(self, keys: list[str]) -> int:
        """Delete `keys` in one revision."""
        if keys:
            self.revision += 1
            for key in keys:
                del self.items[key]
                self.emit(KVEvent("delete", key, b"", self.revision))
            self.save()
        return len(keys)

    def drop_lease(self, lease_id: int) -> None:
        self.leases.pop(lease_id, None)
        self.remove(sorted(k for k, i in self.items.items() if i.lease == lease_id))
        self.save()

    def expire(self) -> None:
        now = time.time()
        for lease_id, (_ttl, expires) in list(self.leases.items()):
            if expires <= now:
                self.drop_lease(lease_id)

    async def reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            self.expire()


_OPEN: dict[Path, _Shared] = {}


class FileKVStore(KVStore):
    name = "file"

    def __init__(self, options, state_dir: Path):
        super().__init__(options, state_dir)
        self.path = Path(self.options.get("path") or Path(state_dir) / "kv.json").absolute()
        self._s: _Shared | None = None

    @property
    def _state(self) -> _Shared:
        if self._s is None:
            raise KVStoreUnavailable(f"kvstore file {self.path} is not open")
        self._s.expire()
        return self._s

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        shared = _OPEN.get(self.path)
        if shared is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                shared = _Shared(self.path)
            except (OSError, ValueError, KeyError) as exc:
                raise KVStoreUnavailable(f"kvstore file {self.path}: {exc}") from None
            _OPEN[self.path] = shared
        shared.users += 1
        if shared.reaper is None or shared.reaper.done():
            shared.reaper = asyncio.get_running_loop().create_task(shared.reap())
        self._s = shared

    async def close(self) -> None:
        shared, self._s = self._s, None
        if shared is None:
            return
        shared.users -= 1
        if shared.users == 0:
            del _OPEN[self.path]
            shared.reaper.cancel()
            for _prefix, queue in shared.watchers:
                queue.put_nowait(None)

    # reads -------------------------------------------------------------------------------
    async def get(self, key: str) -> KVItem | None:
        return self._state.items.get(key)

    async def list(self, prefix: str) -> list[KVItem]:
        items = self._state.items
        return [items[k] for k in sorted(items, key=lambda k: k.encode()) if k.startswith(prefix)]

    async def revision(self) -> int:
        return self._state.revision

    # writes ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        return self._state.write(key, value, lease)

    async def delete(self, key: str) -> bool:
        state = self._state
        return state.remove([key] if key in state.items else []) == 1

    async def delete_prefix(self, prefix: str) -> int:
        state = self._state
        return state.remove(sorted(k for k in state.items if k.startswith(prefix)))

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        return await self.compare_and_swap(key, 0, value, lease)

    async def compare_and_swap(self, key, expected_mod_revision, value, lease=None) -> bool:
        state = self._state
        current = state.items.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return False
        state.write(key, value, lease)
        return True

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        current = self._state.items.get(key)
        if current is None or current.mod_revision != expected_mod_revision:
            return False
        return await self.delete(key)

    # watches -----------------------------------------------------------------------------
    async def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        state = self._state
        if after_revision == 0:
            after_revision = state.revision
        if after_revision < state.history_start:
            raise KVStoreCompacted(
                f"history after revision {after_revision} is gone (kept since "
                f"{state.history_start}); list, then watch from now")
        queue: asyncio.Queue = asyncio.Queue()
        for event in state.history:
            if event.revision > after_revision and event.key.startswith(prefix):
                queue.put_nowait(event)
        state.watchers.append((prefix, queue))
        try:
            while (event := await queue.get()) is not None:
                yield event
            raise KVStoreUnavailable(f"kvstore file {self.path} was closed")
        finally:
            state.watchers.remove((prefix, queue))

    # leases ------------------------------------------------------------------------------
    async def grant_lease(self, ttl: float) -> Lease:
        state = self._state
        lease_id, state.next_lease = state.next_lease, state.next_lease + 1
        state.leases[lease_id] = (ttl, time.time() + ttl)
        state.save()
        return Lease(lease_id, ttl)

    async def keepalive(self, lease: Lease) -> bool:
        state = self._state
        if lease.id not in state.leases:
            return False
        ttl = state.leases[lease.id][0]
        state.leases[lease.id] = (ttl, time.time() + ttl)
        state.save()
        return True

    async def revoke_lease(self, lease: Lease) -> None:
        self._state.drop_lease(lease.id)

    # health ------------------------------------------------------------------------------
    async def status(self) -> dict:
        if self._s is None:
            return {"backend": self.name, "healthy": False, "revision": 0,
                    "detail": f"{self.path} (closed)"}
        return {"backend": self.name, "healthy": True, "revision": self._s.revision,
                "detail": str(self.path), "keys": len(self._s.items)}
