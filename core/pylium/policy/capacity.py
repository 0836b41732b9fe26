"""Will it fit? Before policies are imported, how many policy-map entries each local
endpoint would need with them in force, against what its policy map holds (cilium#27866:
users want to see an overflow coming, not find it as an endpoint stuck on an old policy).

The answer is computed on copies — a repository holding the current policies plus the new
ones (same-named ones replaced, as an import does) and an identity cache copy, so CIDR
identities the new rules would create are not created for real — with the agent's own
engine code, so it is the number the endpoint's regeneration would produce."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from pylium.datapath.maps.policy import entries_needed
from pylium.identity.cache import IdentityCache
from pylium.policy.engine import PolicyEngine
from pylium.policy.repository import PolicyRepository
from pylium.policy.rule import Policy


@attrs.frozen
class EndpointFit:
    """One endpoint's policy-map need under the planned policies."""

    endpoint_id: int
    name: str  # namespace/name
    identity: int
    entries: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.entries <= self.capacity

    def to_dict(self) -> dict:
        return {"endpoint_id": self.endpoint_id, "name": self.name, "identity": self.identity,
                "entries": self.entries, "capacity": self.capacity, "fits": self.fits}


def plan_import(new: Iterable[Policy], current: Iterable[Policy], identities: IdentityCache,
                mode: str, endpoints: Iterable[tuple[int, str, int]],
                capacity: int) -> list[EndpointFit]:
    """Per endpoint `(id, namespace/name, identity)`: the entries its policy map would need
    once `new` is imported on top of `current`."""
    repository = PolicyRepository()
    repository.add(list(current))
    repository.add(list(new))
    cache = IdentityCache(identities.all())
    engine = PolicyEngine(repository, cache, mode)
    try:
        out = []
        for ep_id, name, identity in endpoints:
            if cache.get(identity) is None:
                continue  # not allocated yet (an endpoint being created): nothing to size
            policy = engine.endpoint_policy(identity)
            out.append(EndpointFit(ep_id, name, identity, entries_needed(policy), capacity))
        return out
    finally:
        engine.close()


def overflow_message(fits: list[EndpointFit]) -> str | None:
    """One line naming every endpoint that would overflow, or None when all fit."""
    over = [f for f in fits if not f.fits]
    if not over:
        return None
    named = ", ".join(f"{f.name} (endpoint {f.endpoint_id}: {f.entries} entries)" for f in over)
    return (f"refused: the policy map of {len(over)} endpoint(s) would overflow its "
            f"{over[0].capacity} entries: {named}; nothing was imported")
