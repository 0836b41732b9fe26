"""Agent start-up: the policy repository (loaded from the KV store) and the engine. Every
repository change reaches `pylium_policy_changed(revision, added, deleted)` hook
implementations (added/deleted: the `NamedRule`s, each a rule and its policy's name)."""

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
    hook = daemon.plugins.hook
    # subscribed before the load: plugins hear of the policies the agent starts with too
    repository.subscribe(lambda change: hook.pylium_policy_changed(
        revision=change.revision, added=list(change.added), deleted=list(change.removed)))
    await store.load()
    engine = PolicyEngine(repository, cache, daemon.config.enforcement)
    return PolicyService(repository, store, engine)
