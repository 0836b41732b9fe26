"""A KV store in one JSON file: every write rewrites the file atomically (write + rename).

Good for a demo or a test, not for load: O(size) per write, one process, one node."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pylium.api import KVEvent, KVItem, KVStore, Lease, LeaseNotFound
from pylium.errors import PyliumError


class FileKVStore(KVStore):
    name = "file"

    def __init__(self, options, state_dir: Path):
        super().__init__(options, state_dir)
        self.path = Path(self.options.get("path") or Path(state_dir) / "kv.json")
        self._items: dict[str, KVItem] = {}
        self._leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, expires at)
        self._revision = 0
        self._next_lease = 1
        self._watchers: list[tuple[str, asyncio.Queue]] = []
        self._opened = False

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._load(json.loads(self.path.read_text()))
            else:
                self._save()
        except (OSError, ValueError) as exc:
            raise PyliumError(f"kvstore file {self.path}: {exc}") from None
        self._opened = True

    async def close(self) -> None:
        self._opened = False
        for _prefix, queue in self._watchers:
            queue.put_nowait(None)

    def _load(self, data: dict) -> None:
        self._revision = data["revision"]
        self._next_lease = data["next_lease"]
        self._leases = {int(k): tuple(v) for k, v in data["leases"].items()}
        self._items = {
            k: KVItem(k, base64.b64decode(v["value"]), v["mod"], v["create"], v["lease"])
            for k, v in data["items"].items()
        }

    def _save(self) -> None:
        data = {
            "revision": self._revision, "next_lease": self._next_lease,
            "leases": {str(k): list(v) for k, v in self._leases.items()},
            "items": {k: {"value": base64.b64encode(i.value).decode(), "mod": i.mod_revision,
                          "create": i.create_revision, "lease": i.lease}
                      for k, i in self._items.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    # helpers -----------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.time()
        for lease_id, (_ttl, expires) in list(self._leases.items()):
            if expires <= now:
                self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        del self._leases[lease_id]
        doomed = [k for k, i in self._items.items() if i.lease == lease_id]
        if doomed:
            self._revision += 1
            for key in doomed:
                self._remove(key)
        self._save()

    def _remove(self, key: str) -> None:
        del self._items[key]
        self._notify(KVEvent("delete", key, b"", self._revision))

    def _notify(self, event: KVEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    def _write(self, key: str, value: bytes, lease: Lease | None) -> int:
        if lease is not None and lease.id not in self._leases:
            raise LeaseNotFound(f"lease {lease.id} expired or was revoked")
        self._revision += 1
        old = self._items.get(key)
        self._items[key] = KVItem(key, bytes(value), self._revision,
                                  old.create_revision if old else self._revision,
                                  lease.id if lease else 0)
        self._save()
        self._notify(KVEvent("put", key, bytes(value), self._revision))
        return self._revision

    # reads -------------------------------------------------------------------------------
    async def get(self, key: str) -> KVItem | None:
        self._expire()
        return self._items.get(key)

    async def list(self, prefix: str) -> list[KVItem]:
        self._expire()
        return [self._items[k] for k in sorted(self._items) if k.startswith(prefix)]

    async def revision(self) -> int:
        return self._revision

    # writes ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        self._expire()
        return self._write(key, value, lease)

    async def delete(self, key: str) -> bool:
        self._expire()
        if key not in self._items:
            return False
        self._revision += 1
        self._remove(key)
        self._save()
        return True

    async def delete_prefix(self, prefix: str) -> int:
        self._expire()
        doomed = [k for k in sorted(self._items) if k.startswith(prefix)]
        if doomed:
            self._revision += 1
            for key in doomed:
                self._remove(key)
            self._save()
        return len(doomed)

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        return await self.compare_and_swap(key, 0, value, lease)

    async def compare_and_swap(self, key, expected_mod_revision, value, lease=None) -> bool:
        self._expire()
        current = self._items.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return False
        self._write(key, value, lease)
        return True

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        self._expire()
        current = self._items.get(key)
        if current is None or current.mod_revision != expected_mod_revision:
            return False
        return await self.delete(key)

    # watches (live only: this example keeps no history to resume from) ------------------
    async def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        if after_revision and after_revision < self._revision:
            raise PyliumError("the file KV store keeps no history; list, then watch from now")
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.append((prefix, queue))
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.remove((prefix, queue))

    # leases ------------------------------------------------------------------------------
    async def grant_lease(self, ttl: float) -> Lease:
        lease_id, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease_id] = (ttl, time.time() + ttl)
        self._save()
        return Lease(lease_id, ttl)

    async def keepalive(self, lease: Lease) -> bool:
        self._expire()
        if lease.id not in self._leases:
            return False
        ttl = self._leases[lease.id][0]
        self._leases[lease.id] = (ttl, time.time() + ttl)
        self._save()
        return True

    async def revoke_lease(self, lease: Lease) -> None:
        if lease.id in self._leases:
            self._drop_lease(lease.id)

    # health ------------------------------------------------------------------------------
    async def status(self) -> dict:
        return {"backend": self.name, "healthy": self._opened, "revision": self._revision,
                "detail": str(self.path), "keys": len(self._items)}
