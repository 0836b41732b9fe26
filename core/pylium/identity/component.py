"""Agent start-up: the identity manager on the daemon's KV store. This node's references
to identities live under a lease the agent keeps alive, so a node that dies stops holding
them once the lease expires (and garbage collection can reclaim the numbers)."""

from __future__ import annotations

import asyncio
import logging

from pylium.identity.manager import IdentityManager

log = logging.getLogger(__name__)

LEASE_TTL = 60.0


async def _keepalive(daemon, manager: IdentityManager) -> None:
    while True:
        await asyncio.sleep(LEASE_TTL / 3)
        if manager.lease_owner != "identity":
            return  # the cluster component moved the references onto the node's lease
        try:
            if not await daemon.kvstore.keepalive(manager.allocator.lease):
                log.warning("identity lease expired; taking a new one")
                manager.allocator.lease = await daemon.kvstore.grant_lease(LEASE_TTL)
                for identity in manager.referenced():
                    # same number if it is still (or again) free for these labels
                    await manager.allocator.restore(identity)
        except Exception:
            log.exception("identity lease keepalive failed")


async def start(daemon) -> IdentityManager:
    lease = await daemon.kvstore.grant_lease(LEASE_TTL)
    manager = IdentityManager(daemon.kvstore, daemon.config.node_name, lease)
    revision = await manager.sync()
    manager.start_watch(revision)
    daemon.spawn(_keepalive(daemon, manager))
    return manager
