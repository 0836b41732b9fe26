"""Peers and the selector cache: which identities each peer selector selects.

A peer is what a rule allows or denies traffic from/to: a label selector (`fromEndpoints`),
an entity, a CIDR (with excepts), the wildcard (every identity, the 0 key of the map
state), or nothing (`toFQDNs`/`toServices` until DNS and services can feed identities).
The cache answers `selections(peer)` from memory and, when identities come and go, tells
which peers' selections changed so only the rules using them are recomputed."""

from __future__ import annotations

import ipaddress

import attrs

from pylium.identity.cache import IdentityCache
from pylium.identity.model import RESERVED_BY_NAME, Identity
from pylium.policy.mapstate import IDENTITY_ANY
from pylium.policy.selector import EndpointSelector


class Peer:
    wildcard = False

    def matches(self, identity: Identity) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


@attrs.frozen
class WildcardPeer(Peer):
    wildcard = True

    def matches(self, identity: Identity) -> bool:
        return True

    def __str__(self) -> str:
        return "all"


@attrs.frozen
class NoPeer(Peer):
    """Selects no identity (yet): names that need DNS or the service layer."""

    reason: str

    def matches(self, identity: Identity) -> bool:
        return False

    def __str__(self) -> str:
        return f"nothing ({self.reason})"


@attrs.frozen
class LabelPeer(Peer):
    selector: EndpointSelector

    def matches(self, identity: Identity) -> bool:
        return self.selector.matches(identity.labels)

    def __str__(self) -> str:
        return str(self.selector)


@attrs.frozen
class EntityPeer(Peer):
    entity: str

    def matches(self, identity: Identity) -> bool:
        return entity_matches(self.entity, identity)

    def __str__(self) -> str:
        return f"entity:{self.entity}"


@attrs.frozen
class CIDRPeer(Peer):
    cidr: str
    excepts: tuple[str, ...] = ()

    def matches(self, identity: Identity) -> bool:
        return cidr_matches(self.cidr, self.excepts, identity)

    def __str__(self) -> str:
        return self.cidr + (f" except {','.join(self.excepts)}" if self.excepts else "")


WILDCARD = WildcardPeer()


def entity_matches(entity: str, identity: Identity) -> bool:
    """Cilium's entities: `world` is everything outside the cluster (world and CIDR
    identities), `cluster` everything inside it, the rest their reserved identity."""
    if entity == "all":
        return True
    if entity == "none":
        return False
    if entity in ("world", "world-ipv4", "world-ipv6"):
        if not identity.is_world:
            return False
        if identity.cidr is None or entity == "world":
            return True
        return identity.cidr.version == (4 if entity == "world-ipv4" else 6)
    if entity == "cluster":
        return not identity.is_world
    return identity.id == RESERVED_BY_NAME.get(entity)


def cidr_matches(cidr: str, excepts: tuple[str, ...], identity: Identity) -> bool:
    outer = ipaddress.ip_network(cidr)
    if identity.cidr is None:
        # only the whole address space covers the world identity itself
        return outer.prefixlen == 0 and identity.is_world
    prefix = identity.cidr
    if prefix.version != outer.version or not prefix.subnet_of(outer):
        return False
    for exc in excepts:
        inner = ipaddress.ip_network(exc)
        if prefix.version == inner.version and prefix.subnet_of(inner):
            return False
    return True


class SelectorCache:
    """peer → the identity numbers it selects (IDENTITY_ANY alone for the wildcard)."""

    def __init__(self, identities: IdentityCache):
        self.identities = identities
        self._selections: dict[Peer, frozenset[int]] = {}

    def selections(self, peer: Peer) -> frozenset[int]:
        got = self._selections.get(peer)
        if got is None:
            if peer.wildcard:
                got = frozenset({IDENTITY_ANY})
            else:
                got = frozenset(i.id for i in self.identities if peer.matches(i))
            self._selections[peer] = got
        return got

    def update(self, added: list[Identity], removed: list[Identity]) -> set[Peer]:
        """Apply identity changes; return the peers whose selections changed."""
        changed: set[Peer] = set()
        gone = {i.id for i in removed}
        for peer, current in list(self._selections.items()):
            if peer.wildcard:
                continue
            new = current - gone if gone & current else current
            extra = {i.id for i in added if peer.matches(i)}
            if extra:
                new = new | extra
            if new != current:
                self._selections[peer] = frozenset(new)
                changed.add(peer)
        return changed

    def forget_unused(self, used: set[Peer]) -> None:
        for peer in list(self._selections):
            if peer not in used:
                del self._selections[peer]

    def __len__(self) -> int:
        return len(self._selections)
