"""The agent's cluster session: one lease for everything it publishes, kept alive, and the
KV store's health as the cluster parts see it.

The keepalive doubles as the health probe: a failed keepalive marks the session
`degraded` (nothing is torn down: the datapath keeps its maps and enforcement goes on);
the first one that works again marks it `ok` and runs every resync callback (each follower
re-lists its prefix and reconciles). If the lease expired meanwhile, a new one is granted
and every publisher rewrites its keys under it first.

A store that lost its data (etcd restarted with a wiped data dir) is told apart from a
mere lease expiry by the cluster's incarnation key: a random token, not on any lease,
created by the first agent and remembered by every one. When it is missing or different
after an outage or lease loss, every `on_wipe` callback writes back the state that lives
on no lease (identities with the numbers in use, services) before the resyncers list."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pylium.api.kvstore import (
    KVStore,
    KVStoreTimeout,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 15.0
#: the cluster's incarnation: a token that lives exactly as long as the store's data
INCARNATION_KEY = "pylium/state/cluster/v1/incarnation"
#: clusters up to this many nodes probe at the configured interval; larger ones less often
PROBE_SCALE_FROM = 8
OK = "ok"
DEGRADED = "degraded"

Republisher = Callable[[Lease], Awaitable[None]]
Resyncer = Callable[[], Awaitable[None]]
Rewriter = Callable[[], Awaitable[None]]


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
        self.wipes = 0
        self.incarnation = ""
        self._republishers: list[Republisher] = []
        self._rewriters: list[Rewriter] = []
        self._wipe_noticers: list[Callable[[], None]] = []
        self._resyncers: list[Resyncer] = []
        self._task: asyncio.Task | None = None
        #: probes in a row that got no answer in time (a store that refuses connections
        #: degrades at once; one slow answer on a busy node does not, see `probe`)
        self._slow_probes = 0
        #: seconds the event loop woke up late for the last probe
        self.loop_lag = 0.0
        #: (lease, keepalive task) of a probe that timed out, still waiting for its answer
        self._in_flight: tuple[Lease, asyncio.Task] | None = None
        #: how many nodes the cluster has (`NodeRegistry` tells), for the probe interval
        self._cluster_size: Callable[[], int] | None = None

    # wiring ---------------------------------------------------------------------------------
    def on_new_lease(self, republish: Republisher) -> None:
        """`republish(lease)` rewrites the caller's keys after the lease had to be replaced."""
        self._republishers.append(republish)

    def on_resync(self, resync: Resyncer) -> None:
        """`resync()` runs when the store is back after an outage (after any republish)."""
        self._resyncers.append(resync)

    def on_wipe(self, rewrite: Rewriter) -> None:
        """`rewrite()` writes back the caller's state that is on no lease (create-if-absent:
        another node may have written it back first) after the store lost its data."""
        self._rewriters.append(rewrite)

    def on_wipe_noticed(self, notice: Callable[[], None]) -> None:
        """`notice()` runs as soon as this session finds the store lost its data, before
        anything is written back: a follower's next list must keep the keys it misses
        (`PrefixMirror.store_wiped`), even when the nodes writing back have already taken
        the new store's revision past the one it had seen."""
        self._wipe_noticers.append(notice)

    def size_from(self, cluster_size: Callable[[], int]) -> None:
        """`cluster_size()` is the number of nodes: a large cluster probes less often."""
        self._cluster_size = cluster_size

    @property
    def current_probe_interval(self) -> float:
        """The configured interval up to `PROBE_SCALE_FROM` nodes, then growing with
        log(1 + nodes) (Cilium scales the intervals at which every node hits a shared
        resource the same way, `ClusterSizeDependantInterval`), at most a third of the
        lease TTL: 1,000 agents keepalive ~320 times a second instead of 1,000, and a busy
        store is not kept busier by its own health checks."""
        nodes = self._cluster_size() if self._cluster_size is not None else 1
        if nodes <= PROBE_SCALE_FROM:
            return self.probe_interval
        scaled = self.probe_interval * math.log1p(nodes) / math.log1p(PROBE_SCALE_FROM)
        return min(scaled, max(self.ttl / 3, self.probe_interval))

    @property
    def probe_timeout(self) -> float:
        """Three probe intervals, at least 2 s, plus twice how late the event loop last
        woke up (the time is for the store to answer, not for this process to get round
        to reading the answer), in all at most half the lease: a slow answer while the
        lease is safe is not an outage."""
        interval = self.current_probe_interval
        base = max(2.0, min(interval * 3, self.ttl / 2))
        return max(base, min(base + 2 * self.loop_lag, self.ttl / 2))

    @property
    def reset_grace(self) -> float:
        """How long followers keep keys a wiped store lost: every live node notices (its
        keepalive fails) and writes its keys back well within two lease TTLs."""
        return 2 * self.ttl + 5

    @property
    def healthy(self) -> bool:
        return self.state == OK

    # lifecycle ------------------------------------------------------------------------------
    async def open(self) -> Lease:
        self.lease = await self.kvstore.grant_lease(self.ttl)
        self.incarnation = await self._incarnation()
        return self.lease

    async def _incarnation(self) -> str:
        """The store's incarnation token, creating it if this is the first node."""
        token = secrets.token_hex(8)
        if await self.kvstore.create(INCARNATION_KEY, token.encode()):
            return token
        item = await self.kvstore.get(INCARNATION_KEY)
        return item.value.decode(errors="replace") if item is not None else token

    async def _check_wiped(self) -> bool:
        """True (and the state on no lease written back) if the store lost its data since
        this session last looked."""
        item = await self.kvstore.get(INCARNATION_KEY)
        if item is not None and item.value.decode(errors="replace") == self.incarnation:
            return False
        previous, self.incarnation = self.incarnation, await self._incarnation()
        self.wipes += 1
        for notice in list(self._wipe_noticers):
            notice()
        log.warning("the kvstore lost its data (incarnation %s, now %s): writing back this "
                    "node's identities, node, endpoints and services", previous or "-",
                    self.incarnation)
        for rewrite in list(self._rewriters):
            await rewrite()
        return True

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def run(self) -> None:
        while True:
            # jittered, so the agents of a cluster (or a bench's simulated nodes) that all
            # started together do not keep probing, and re-listing, in lockstep
            loop = asyncio.get_running_loop()
            delay = self.current_probe_interval * random.uniform(0.8, 1.2)
            due = loop.time() + delay
            await asyncio.sleep(delay)
            # how late this loop woke up: a saturated agent is slow to read any answer
            self.loop_lag = max(0.0, loop.time() - due)
            await self.probe()

    async def probe(self) -> bool:
        """One keepalive; handles expiry, outage and recovery. True if the store answered."""
        try:
            alive = await self._keepalive()
            if not alive or self.state != OK:
                # after a wipe: state on no lease back first, then the keys on the lease
                # (republishers), then every follower lists again
                wiped = await self._check_wiped()
                if not alive:
                    await self._renew(resync=self.state == OK or wiped)
                elif wiped:
                    await self._run_resyncers()
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
        except (TimeoutError, KVStoreTimeout):
            # no answer in time: on a saturated node that is our own event loop as often as
            # the store (or the store said it is behind: etcd's "request timed out"). The
            # lease outlives several probes, so one slow probe changes nothing; the second
            # in a row degrades (and later re-lists), as before
            self._slow_probes += 1
            if self._slow_probes >= 2:
                self._degraded(f"no answer from the kvstore in {self._slow_probes} probes")
            return False
        except (KVStoreUnavailable, OSError) as exc:
            self._degraded(str(exc) or type(exc).__name__)
            return False
        self._slow_probes = 0
        return self.state == OK

    async def _keepalive(self) -> bool:
        """One keepalive, answered within `probe_timeout` (TimeoutError otherwise). A
        keepalive that timed out stays in flight until the next probe, and an answer to
        either counts: an agent whose own event loop was starved (a saturated node, many
        simulated agents in one process) reads the answer late, but the store did answer;
        a store that answers neither is silent for two whole timeouts."""
        loop = asyncio.get_running_loop()
        lease = self.lease
        fresh = loop.create_task(self.kvstore.keepalive(lease))
        waiting = {fresh}
        late = self._in_flight
        self._in_flight = None
        if late is not None and late[0] is lease:
            waiting.add(late[1])
        elif late is not None:
            late[1].cancel()  # for a lease since replaced
        try:
            done, _ = await asyncio.wait(waiting, timeout=self.probe_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            for task in waiting:
                task.cancel()
            raise
        if not done:
            for task in waiting - {fresh}:
                task.cancel()
            self._in_flight = (lease, fresh)
            raise TimeoutError
        for task in waiting - done:
            task.cancel()
        answered = fresh if fresh in done else done.pop()
        return answered.result()

    async def _renew(self, resync: bool = True) -> None:
        log.warning("cluster lease %x expired; granting a new one and republishing",
                    self.lease.id if self.lease else 0)
        self.lease = await self.kvstore.grant_lease(self.ttl)
        self.lease_renewals += 1
        for republish in list(self._republishers):
            await republish(self.lease)
        if resync and self.state == OK:
            # keys were lost without us noticing an outage: re-list too (when degraded,
            # `_recover` re-lists)
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
        if self._in_flight is not None:
            self._in_flight[1].cancel()
            await asyncio.gather(self._in_flight[1], return_exceptions=True)
            self._in_flight = None
        if revoke and self.lease is not None:
            try:
                await self.kvstore.revoke_lease(self.lease)
            except KVStoreUnavailable:
                log.info("could not revoke the cluster lease; it expires in %gs", self.ttl)

    def status(self) -> dict[str, Any]:
        return {"kvstore": self.state, "since": round(self.since, 3),
                "lease": f"{self.lease.id:x}" if self.lease else "", "lease_ttl": self.ttl,
                "outages": self.outages, "resyncs": self.resyncs,
                "lease_renewals": self.lease_renewals, "wipes": self.wipes,
                "incarnation": self.incarnation, "last_error": self.last_error}
