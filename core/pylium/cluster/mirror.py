"""Follow one KV prefix: list it, then watch from the revision read before the list, and
report every key whose value changed (Cilium's list-then-watch with a resume revision).

`resync()` drops the watch and lists again: keys that changed or vanished while the watch
could not see them (an outage, a compacted history) are reported as such, so whoever
follows the mirror converges on exactly the store's contents.

A store that lost its data (`KVStoreReset`: etcd back with a wiped data dir) lists empty
until every node has written its state back. Keys missing from the list after a reset are
therefore kept for `reset_grace` seconds and dropped only if nobody rewrote them by then:
a wipe does not take remote nodes, endpoints or services away from the datapath while
their owners are putting them back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pylium.api.kvstore import KVStore, KVStoreCompacted, KVStoreReset, KVStoreUnavailable

log = logging.getLogger(__name__)

#: on_change(key, old value or None, new value or None)
ChangeCallback = Callable[[str, bytes | None, bytes | None], None]
#: on_changes([(key, old value or None, new value or None), ...]): a whole batch at once
ChangesCallback = Callable[[list[tuple[str, bytes | None, bytes | None]]], None]


class PrefixMirror:
    def __init__(self, kvstore: KVStore, prefix: str, on_change: ChangeCallback,
                 on_synced: Callable[[], Awaitable[None] | None] | None = None,
                 retry_interval: float = 0.5, reset_grace: float = 15.0,
                 on_changes: ChangesCallback | None = None):
        """`on_changes`, when given, gets each batch of changes (a list, a watch response)
        in one call instead of `on_change` per key: a follower of thousands of keys on a
        hundred nodes pays its per-call overhead per batch."""
        self.kvstore = kvstore
        self.on_changes = on_changes
        self.reset_grace = reset_grace
        #: keys a reset's list did not have, kept until this monotonic time
        self.stale: dict[str, float] = {}
        self.resets = 0
        self._reset = False
        self.prefix = prefix
        self.on_change = on_change
        self.on_synced = on_synced
        self.retry_interval = retry_interval
        self.items: dict[str, bytes] = {}
        #: set once the first list has been applied
        self.synced = asyncio.Event()
        self.lists = 0
        self.events = 0
        self.revision = 0
        self._task: asyncio.Task | None = None
        self._inner: asyncio.Task | None = None
        self._resync_requested = False
        self._listed = asyncio.Event()

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def run(self) -> None:
        while True:
            self._inner = asyncio.get_running_loop().create_task(self._list_and_watch())
            try:
                await self._inner
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling() or not self._resync_requested:
                    raise
                self._resync_requested = False
                continue  # resync(): list again right away
            except KVStoreReset as exc:
                log.warning("following %s: %s; listing again, keeping what is missing for "
                            "%gs", self.prefix, exc, self.reset_grace)
                self._reset = True
                self.resets += 1
            except (KVStoreUnavailable, KVStoreCompacted) as exc:
                log.debug("following %s: %s; listing again", self.prefix, exc)
            except Exception:
                log.exception("following %s failed; listing again", self.prefix)
            await asyncio.sleep(self.retry_interval)

    def store_wiped(self) -> None:
        """The store lost its data (the cluster session noticed): the next list keeps what
        it misses for `reset_grace`. The watch's own check (a revision gone back) misses a
        wipe when the nodes writing back took the new store's revision past ours first."""
        if not self._reset:
            self._reset = True
            self.resets += 1

    async def resync(self, wait: float | None = 10.0) -> None:
        """List the prefix again now; waits (up to `wait` s) until the new list is applied."""
        self._listed.clear()
        if self._inner is not None and not self._inner.done():
            self._resync_requested = True
            self._inner.cancel()
        if wait:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._listed.wait()

    async def _list_and_watch(self) -> None:
        revision = await self.kvstore.revision()
        listed = {item.key: item.value for item in await self.kvstore.list(self.prefix)}
        self.lists += 1
        now = asyncio.get_running_loop().time()
        if self._reset or revision < self.revision:  # the store went back in time
            self._reset = False
            for key in self.items:
                if key not in listed:
                    self.stale.setdefault(key, now + self.reset_grace)
        changes = []
        for key in [k for k in self.items if k not in listed]:
            if self.stale.get(key, 0) <= now:
                self.stale.pop(key, None)
                changes.append(self._update(key, None))
        for key in listed:
            self.stale.pop(key, None)
        self.revision = revision
        changes += [self._update(key, value) for key, value in listed.items()]
        self._deliver(changes)
        self.synced.set()
        self._listed.set()
        if self.on_synced is not None:
            result = self.on_synced()
            if asyncio.iscoroutine(result):
                await result
        expiry = asyncio.get_running_loop().create_task(self._expire_stale()) \
            if self.stale else None
        try:
            async with contextlib.aclosing(
                    self.kvstore.watch_batches(self.prefix, revision)) as batches:
                async for batch in batches:
                    self.events += len(batch)
                    self.revision = max(self.revision, batch[-1].revision)
                    if len(batch) > 1:  # several events of one key: only the last counts
                        batch = {event.key: event for event in batch}.values()
                    stale, items = self.stale, self.items
                    changes = []
                    for event in batch:  # `_update` inlined: every node runs this per event
                        key = event.key
                        if stale:
                            stale.pop(key, None)
                        old = items.get(key)
                        if event.type == "put":
                            value = event.value
                            if old == value:
                                continue
                            items[key] = value
                        else:
                            if old is None:
                                continue
                            del items[key]
                            value = None
                        changes.append((key, old, value))
                    if changes:
                        self._deliver(changes)
                    # nor keep the last batch while waiting for the next
                    batch = changes = event = value = old = None
        finally:
            if expiry is not None:
                expiry.cancel()

    async def _expire_stale(self) -> None:
        """Drop the keys a reset's list missed that nobody wrote back within the grace."""
        loop = asyncio.get_running_loop()
        while self.stale:
            await asyncio.sleep(max(0.0, min(self.stale.values()) - loop.time()))
            now = loop.time()
            changes = []
            for key in [k for k, until in self.stale.items() if until <= now]:
                del self.stale[key]
                changes.append(self._update(key, None))
            self._deliver(changes)

    def _update(self, key: str, value: bytes | None) -> tuple | None:
        """Take `value` (None: deleted) for `key`; the change, or None if nothing changed."""
        old = self.items.get(key)
        if value is None:
            if old is None:
                return None
            del self.items[key]
        else:
            if old == value:
                return None
            self.items[key] = value
        return key, old, value

    def _deliver(self, changes: list[tuple | None]) -> None:
        changes = [change for change in changes if change is not None]
        if not changes:
            return
        if self.on_changes is not None:
            try:
                self.on_changes(changes)
            except Exception:
                log.exception("applying %d changes under %s failed", len(changes), self.prefix)
            return
        for key, old, value in changes:
            try:
                self.on_change(key, old, value)
            except Exception:
                log.exception("applying %s of %s failed",
                              "delete" if value is None else "put", key)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
