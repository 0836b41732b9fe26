"""The node's identity manager: allocates through the KV store, keeps the `IdentityCache`
(reserved + allocated + local CIDR identities) current, and follows other nodes'
allocations with a KV-store watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from pylium.api.kvstore import KVStore, KVStoreCompacted, KVStoreUnavailable, Lease
from pylium.documents import RecordError
from pylium.identity.allocator import ID_PREFIX, IdentityAllocator, decode_identity
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity

log = logging.getLogger(__name__)


class IdentityManager:
    def __init__(self, kvstore: KVStore, node: str, lease: Lease | None = None):
        self.kvstore = kvstore
        self.cache = IdentityCache()
        # numbers this node knows in use are never claimed for a new label set, even when
        # the store does not have them (it lost its data and their users have not written
        # them back yet): one number never names two label sets
        self.allocator = IdentityAllocator(kvstore, node, lease,
                                           known=lambda: {i.id for i in self.cache})
        #: identity number → how many local users (endpoints) hold it
        self._local_refs: dict[int, int] = {}
        #: label set → the allocation in the store under way for it
        self._allocating: dict[LabelSet, asyncio.Future] = {}
        self._watch_task: asyncio.Task | None = None
        #: numbers whose release failed because the store was down
        self.pending_releases: set[int] = set()
        #: who keeps `allocator.lease` alive: this component, or "cluster" once the node's
        #: cluster lease carries the references
        self.lease_owner = "identity"

    async def sync(self) -> int:
        """Load every allocated identity; returns the store revision read at."""
        revision = await self.kvstore.revision()
        for identity in await self.allocator.list():
            if identity.id not in self.cache:
                self.cache.add(identity)
        return revision

    async def allocate(self, labels: LabelSet | Iterable) -> Identity:
        labels = LabelSet(labels)
        while True:
            held = self.cache.by_labels(labels)
            if held is not None and self._local_refs.get(held.id, 0) > 0:
                # this node already references it (its key is on the node's lease and
                # comes back with the lease after an outage): no round trip, and a pod
                # whose labels an endpoint here already has is wired even while the KV
                # store is down
                self._local_refs[held.id] += 1
                return held
            pending = self._allocating.get(labels)
            if pending is None:
                break
            # the pods of one workload starting together: one allocation in the store for
            # all of them (each racing the others' fence writes would retry over and
            # over); its error is theirs too
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise
        future = asyncio.get_running_loop().create_future()
        self._allocating[labels] = future
        try:
            identity = await self.allocator.allocate(labels)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning without waiters
            else:
                future.cancel()
            raise
        finally:
            del self._allocating[labels]
        if identity.id not in self.cache:
            self.cache.add(identity)
        if not identity.reserved:
            self._local_refs[identity.id] = self._local_refs.get(identity.id, 0) + 1
        future.set_result(identity)
        return identity

    async def release(self, identity: Identity | int) -> None:
        """One local user is done; the node's reference goes when the last one is."""
        number = identity.id if isinstance(identity, Identity) else identity
        count = self._local_refs.get(number, 0) - 1
        if count > 0:
            self._local_refs[number] = count
            return
        self._local_refs.pop(number, None)
        try:
            await self.allocator.release(number)
        except KVStoreUnavailable:
            # the store is down: drop the reference once it is back (`retry_releases`),
            # or it would keep the number from garbage collection for as long as we live
            self.pending_releases.add(number)
            raise

    async def retry_releases(self) -> list[int]:
        """Release references a KV-store outage kept (unless used again meanwhile)."""
        done = []
        for number in sorted(self.pending_releases):
            if number not in self._local_refs:
                await self.allocator.release(number)
            self.pending_releases.discard(number)
            done.append(number)
        return done

    def references(self) -> dict[int, int]:
        """Identity number → how many local users hold it."""
        return dict(self._local_refs)

    def referenced(self) -> list[Identity]:
        """Identities this node holds references to."""
        return [i for n in self._local_refs if (i := self.cache.get(n)) is not None]

    def lookup(self, number: int) -> Identity | None:
        return self.cache.get(number)

    def lookup_labels(self, labels: LabelSet) -> Identity | None:
        return self.cache.by_labels(labels)

    def list(self) -> list[Identity]:
        return self.cache.all()

    async def watch(self, after_revision: int, retry_interval: float = 0.5) -> None:
        """Follow other nodes' allocations and garbage collection (runs until cancelled).
        A history the watch cannot resume (compacted, or the store lost its data) is
        replaced by a fresh list; an unreachable store is retried."""
        while True:
            try:
                await self._follow(after_revision)
            except (KVStoreCompacted, KVStoreUnavailable) as exc:
                log.info("identity watch: %s; listing again", exc)
            await asyncio.sleep(retry_interval)
            with contextlib.suppress(KVStoreUnavailable):  # else: resume where we were
                after_revision = await self.sync()

    async def resync(self) -> None:
        """The store is back after an outage: learn what the watch may have missed (the
        cache only grows here; deletions come from the garbage collector's events)."""
        if self._watch_task is None:
            return
        self._watch_task.cancel()
        await asyncio.gather(self._watch_task, return_exceptions=True)
        self.start_watch(await self.sync())

    async def _follow(self, after_revision: int) -> None:
        async for event in self.kvstore.watch(ID_PREFIX, after_revision):
            try:
                if event.type == "put":
                    identity = decode_identity(event.key, event.value)
                    if identity.id not in self.cache:
                        self.cache.add(identity)
                else:
                    self.cache.remove(decode_identity(event.key, b"[]").id)
            except RecordError as exc:
                log.warning("ignoring unreadable identity record: %s", exc)
            except Exception:
                log.exception("identity event %s %s", event.type, event.key)

    def start_watch(self, revision: int) -> asyncio.Task:
        self._watch_task = asyncio.get_running_loop().create_task(self.watch(revision))
        return self._watch_task

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
