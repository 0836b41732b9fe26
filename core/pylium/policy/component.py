"""Agent start-up: the policy repository (loaded from the KV store) and the engine."""

from __future__ import annotations

import attrs

from pylium.identity.cache import IdentityCache
from pylium.policy.engine import PolicyEngine
from pylium.policy.repository import PolicyRepository, PolicyStore


@attrs.define
class PolicyService:
    repository: PolicyRepository
    store: PolicyStore
    engine: PolicyEngine

    def close(self) -> None:
        self.engine.close()


async def start(daemon) -> PolicyService:
    identities = daemon.components.get("identity")
    cache = identities.cache if identities is not None else IdentityCache()
    repository = PolicyRepository()
    store = PolicyStore(repository, daemon.kvstore)
    await store.load()
    engine = PolicyEngine(repository, cache, daemon.config.enforcement)
    return PolicyService(repository, store, engine)
