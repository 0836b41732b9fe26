"""The KV-store contract every backend implements (embedded SQLite, etcd, Consul, ...).

Semantics follow etcd, Cilium's reference store: one cluster-wide revision that increases on
every change, per-key `mod_revision`, leases whose expiry deletes the keys attached to them,
and prefix watches that can resume after a given revision so a reconnecting agent misses
nothing. The conformance suite in `pylium.kvstore.conformance` pins this down; any backend,
third-party ones included, runs it against itself."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from pylium.errors import PyliumError


class KVStoreUnavailable(PyliumError):
    """The store cannot be reached or has been closed (callers report "degraded" and retry)."""


class KVStoreTimeout(KVStoreUnavailable):
    """The store is there but did not complete the request in time (etcd: "request timed
    out", e.g. its apply is behind under load). Anyone retrying treats it as unavailable;
    the cluster session's health probe as a slow answer, not an outage."""


class KVStoreCompacted(PyliumError):
    """A watch asked to resume after a revision whose history is no longer kept: list the
    prefix again and watch from the current revision."""


class KVStoreReset(KVStoreCompacted):
    """The store's revision went backwards (it was restored or restarted with a wiped data
    dir): its history is gone and so may be any key. List again; whoever owns state that is
    not on a lease writes it back first (`ClusterSession.on_wipe`)."""


class LeaseNotFound(PyliumError):
    """A write named a lease that expired or was revoked: grant a new one and rewrite."""


@attrs.frozen
class KVItem:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@attrs.frozen
class KVEvent:
    type: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@attrs.frozen
class Lease:
    id: int
    ttl: float


class KVStore(abc.ABC):
    """Asynchronous key-value store. Keys are `str`, values `bytes`."""

    #: backend name, e.g. "embedded", "etcd"
    name: str = ""

    def __init__(self, options: Mapping[str, Any], state_dir: Path):
        self.options = dict(options)
        self.state_dir = Path(state_dir)

    @classmethod
    def from_context(cls, context: Any) -> KVStore:
        """How the core builds the backend from a `pylium.api.context.KVStoreContext` (the
        constructor keeps its (options, state_dir) form for direct use in tests)."""
        return cls(context.options, context.state_dir)

    # lifecycle -------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / open files. Raises `PyliumError` with a clear message on failure."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> KVStore:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # reads -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, key: str) -> KVItem | None: ...

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[KVItem]:
        """All items whose key starts with `prefix`, sorted by key (byte order of UTF-8).

        To follow a prefix without missing changes: `rev = await revision()`, then `list()`,
        then `watch(prefix, after_revision=rev)` (events already reflected in the list may be
        delivered again; applying them is idempotent)."""

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision: at least 1 (a new etcd or embedded store starts at 1),
        so `watch(prefix, after_revision=await revision())` never means "from now on"."""

    # writes ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Write unconditionally; returns the new revision. A write without `lease` detaches
        the key from any lease it had (etcd semantics). Raises `LeaseNotFound` if `lease`
        expired or was revoked."""

    async def put_many(self, items: list[tuple[str, bytes]], lease: Lease | None = None) -> int:
        """Write several keys (same semantics as `put` each); returns the last revision.
        A backend that can write them in one transaction does (etcd: up to its 128
        operations per transaction), so a watcher gets them in one event batch."""
        revision = 0
        for key, value in items:
            revision = await self.put(key, value, lease)
        return revision

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete one key; True if it existed."""

    async def delete_many(self, keys: list[str]) -> int:
        """Delete several keys; returns how many existed. A backend that can delete them in
        one transaction does, so a watcher gets them in one event batch."""
        deleted = 0
        for key in keys:
            deleted += bool(await self.delete(key))
        return deleted

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many were deleted."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Write only if the key does not exist; True if this call created it."""

    @abc.abstractmethod
    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: Lease | None = None
    ) -> bool:
        """Write only if the key's mod_revision equals `expected_mod_revision`
        (0 means "must not exist"); True if written."""

    @abc.abstractmethod
    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool: ...

    # watches -----------------------------------------------------------------------------
    @abc.abstractmethod
    def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        """Yield every change under `prefix` with revision > `after_revision`, in order,
        then keep yielding new ones until the iterator is closed. `after_revision=0` means
        "from now on": from the store's revision when the watch is established (at the first
        `__anext__`). One `delete_prefix` yields one delete event per key, all with the same
        revision. Raises `KVStoreCompacted` if the history after `after_revision` is gone
        (`KVStoreReset` when the store's revision went backwards, e.g. a wiped etcd), and
        `KVStoreUnavailable` when the store is closed or unreachable."""

    async def watch_batches(self, prefix: str,
                            after_revision: int = 0) -> AsyncIterator[list[KVEvent]]:
        """`watch`, several events at a time: each list holds the events the store delivered
        together (etcd: one watch response, often a whole transaction or more), in order,
        never empty. Same events, resumption and errors as `watch`. A follower of thousands
        of keys applies a list in one step instead of paying per event; this default yields
        one event per list, a backend that receives events in batches overrides it."""
        async with contextlib.aclosing(self.watch(prefix, after_revision)) as events:
            async for event in events:
                yield [event]

    # leases ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> Lease:
        """A new lease that expires `ttl` seconds from now unless kept alive. Backends may
        round `ttl` up to their minimum (`Lease.ttl` says what was granted)."""

    @abc.abstractmethod
    async def keepalive(self, lease: Lease) -> bool:
        """Refresh a lease once; False if it already expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: Lease) -> None:
        """End a lease now, deleting its keys."""

    # health ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """`{"backend": name, "healthy": bool, "revision": int, "detail": str}`"""
