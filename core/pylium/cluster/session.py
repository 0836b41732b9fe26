"""The agent's cluster session: one lease for everything it publishes, kept alive, and the
KV store's health as the cluster parts see it.

The keepalive doubles as the health probe: a failed keepalive marks the session
`degraded` (nothing is torn down: the datapath keeps its maps and enforcement goes on);
the first one that works again marks it `ok` and runs every resync callback (each follower
re-lists its prefix and reconciles). If the lease expired meanwhile, a new one is granted
and every publisher rewrites its keys under it first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pylium.api.kvstore import KVStore, KVStoreUnavailable, Lease, LeaseNotFound

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 15.0
OK = "ok"
DEGRADED = "degraded"

Republisher = Callable[[Lease], Awaitable[None]]
Resyncer = Callable[[], Awaitable[None]]


class ClusterSession:
    def __init__(self, kvstore: KVStore, ttl: float = DEFAULT_LEASE_TTL,
                 probe_interval: float | None = None):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.kvstore = kvstore
        self.ttl = float(ttl)
        self.probe_interval = probe_interval or min(self.ttl / 3, 1.0)
        self.lease: Lease | None = None
        self.state = OK
        self.since = time.time()
        self.last_error = ""
        self.outages = 0
        self.resyncs = 0
        self.lease_renewals = 0
        self._republishers: list[Republisher] = []
        self._resyncers: list[Resyncer] = []
        self._task: asyncio.Task | None = None

    # wiring ---------------------------------------------------------------------------------
    def on_new_lease(self, republish: Republisher) -> None:
        """`republish(lease)` rewrites the caller's keys after the lease had to be replaced."""
        self._republishers.append(republish)

    def on_resync(self, resync: Resyncer) -> None:
        """`resync()` runs when the store is back after an outage (after any republish)."""
        self._resyncers.append(resync)

    @property
    def healthy(self) -> bool:
        return self.state == OK

    # lifecycle ------------------------------------------------------------------------------
    async def open(self) -> Lease:
        self.lease = await self.kvstore.grant_lease(self.ttl)
        return self.lease

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.probe()

    async def probe(self) -> bool:
        """One keepalive; handles expiry, outage and recovery. True if the store answered."""
        try:
            async with asyncio.timeout(max(self.probe_interval * 3, 2.0)):
                if not await self.kvstore.keepalive(self.lease):
                    await self._renew()
            if self.state != OK:
                await self._recover()
        except LeaseNotFound:
            # the lease ran out between the keepalive and a write (e.g. while the store
            # restarted): take a new one now, the next probe recovers
            try:
                await self._renew()
            except (KVStoreUnavailable, LeaseNotFound, TimeoutError, OSError) as exc:
                self._degraded(str(exc) or type(exc).__name__)
            return False
        except (KVStoreUnavailable, TimeoutError, OSError) as exc:
            self._degraded(str(exc) or type(exc).__name__)
            return False
        return self.state == OK

    async def _renew(self) -> None:
        log.warning("cluster lease %x expired; granting a new one and republishing",
                    self.lease.id if self.lease else 0)
        self.lease = await self.kvstore.grant_lease(self.ttl)
        self.lease_renewals += 1
        for republish in list(self._republishers):
            await republish(self.lease)
        if self.state == OK:  # keys were lost without us noticing an outage: re-list too
            await self._run_resyncers()

    def _degraded(self, reason: str) -> None:
        self.last_error = reason
        if self.state != DEGRADED:
            self.state, self.since = DEGRADED, time.time()
            self.outages += 1
            log.warning("kvstore unreachable, cluster state degraded (datapath keeps "
                        "enforcing what it has): %s", reason)

    async def _recover(self) -> None:
        try:
            await self._run_resyncers()
        except (KVStoreUnavailable, TimeoutError, OSError) as exc:
            self._degraded(str(exc) or type(exc).__name__)
            return
        except Exception:
            # a resyncer's own bug must not stop the session: stay degraded, retry next probe
            log.exception("cluster resync failed")
            return
        log.info("kvstore reachable again after %.1fs: cluster state resynced",
                 time.time() - self.since)
        self.state, self.since = OK, time.time()

    async def _run_resyncers(self) -> None:
        self.resyncs += 1
        for resync in list(self._resyncers):
            await resync()

    async def close(self, revoke: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if revoke and self.lease is not None:
            try:
                await self.kvstore.revoke_lease(self.lease)
            except KVStoreUnavailable:
                log.info("could not revoke the cluster lease; it expires in %gs", self.ttl)

    def status(self) -> dict[str, Any]:
        return {"kvstore": self.state, "since": round(self.since, 3),
                "lease": f"{self.lease.id:x}" if self.lease else "", "lease_ttl": self.ttl,
                "outages": self.outages, "resyncs": self.resyncs,
                "lease_renewals": self.lease_renewals, "last_error": self.last_error}
