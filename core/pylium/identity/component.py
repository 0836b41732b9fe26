"""Agent start-up: the identity manager on the daemon's KV store."""

from __future__ import annotations

from pylium.identity.manager import IdentityManager


async def start(daemon) -> IdentityManager:
    manager = IdentityManager(daemon.kvstore, daemon.config.node_name)
    revision = await manager.sync()
    manager.start_watch(revision)
    return manager
