"""Peers and the selector cache: which identities each peer selector selects.

A peer is what a rule allows or denies traffic from/to: a label selector (`fromEndpoints`),
an entity, a CIDR (with excepts), the wildcard (every identity, the 0 key of the map
state), or nothing (`toFQDNs`/`toServices` until DNS and services can feed identities).
The cache answers `selections(peer)` from memory and, when identities come and go, tells
which peers' selections changed so only the rules using them are recomputed."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

import attrs

from pylium.identity.cache import IdentityCache
from pylium.identity.labels import SOURCE_ANY, split_source
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


@attrs.frozen(cache_hash=True)
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


@functools.lru_cache(maxsize=16384)
def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A parsed prefix, kept: rules name the same few prefixes for every identity."""
    return ipaddress.ip_network(text)


def cidr_matches(cidr: str, excepts: tuple[str, ...], identity: Identity) -> bool:
    outer = network(cidr)
    if identity.cidr is None:
        # only the whole address space covers the world identity itself
        return outer.prefixlen == 0 and identity.is_world
    prefix = identity.cidr
    if prefix.version != outer.version or not prefix.subnet_of(outer):
        return False
    for exc in excepts:
        inner = network(exc)
        if prefix.version == inner.version and prefix.subnet_of(inner):
            return False
    return True


def selector_anchor(selector: EndpointSelector) -> tuple[str, str] | None:
    """The (key, value) every label set the selector matches must carry (from any source),
    or None when the selector names no matchLabels (it has to be tested against all)."""
    if not selector.match_labels:
        return None
    raw_key, value = selector.match_labels[0]
    return split_source(raw_key, SOURCE_ANY)[1], value


def peer_anchor(peer: Peer) -> tuple[str, str] | None:
    """The anchor of a label peer (see `selector_anchor`); None for every other peer."""
    return selector_anchor(peer.selector) if isinstance(peer, LabelPeer) else None


class IdentityIndex:
    """Identity numbers by label (key, value) from any source, and the world/CIDR ones:
    the candidates a selector can match, so a selection tests a handful of identities
    instead of all of them. Follows the identity cache by its generation."""

    def __init__(self, identities: IdentityCache):
        self.identities = identities
        self._generation = -1
        self._by_label: dict[tuple[str, str], set[int]] = {}
        self._world: set[int] = set()

    def sync(self) -> None:
        if self._generation == self.identities.generation:
            return
        self._by_label = {}
        self._world = set()
        for identity in self.identities:
            self._add(identity)
        self._generation = self.identities.generation

    def apply(self, added: Iterable[Identity], removed: Iterable[Identity]) -> None:
        """Follow one change of the cache (cheaper than `sync`'s rebuild)."""
        if self._generation != self.identities.generation - 1:
            return self.sync()  # not built yet, or a change went unheard: rebuild
        for identity in removed:
            for lb in identity.labels:
                ids = self._by_label.get((lb.key, lb.value))
                if ids is not None:
                    ids.discard(identity.id)
                    if not ids:
                        del self._by_label[(lb.key, lb.value)]
            self._world.discard(identity.id)
        for identity in added:
            self._add(identity)
        self._generation = self.identities.generation
        return None

    def _add(self, identity: Identity) -> None:
        for lb in identity.labels:
            self._by_label.setdefault((lb.key, lb.value), set()).add(identity.id)
        if identity.is_world:
            self._world.add(identity.id)

    def with_anchor(self, anchor: tuple[str, str] | None) -> list[Identity]:
        """The identities carrying the label `anchor` (every identity for None)."""
        self.sync()
        if anchor is None:
            return list(self.identities)
        return self._get(self._by_label.get(anchor, ()))

    def _get(self, numbers: Iterable[int]) -> list[Identity]:
        get = self.identities.get
        return [i for i in map(get, list(numbers)) if i is not None]

    def candidates(self, peer: Peer) -> list[Identity]:
        """A superset of the identities `peer` selects (the caller still tests each)."""
        if isinstance(peer, CIDRPeer):
            self.sync()
            return self._get(self._world)
        return self.with_anchor(peer_anchor(peer))


class SelectorCache:

    """peer → the identity numbers it selects (IDENTITY_ANY alone for the wildcard)."""

    def __init__(self, identities: IdentityCache):
        self.identities = identities
        self.index = IdentityIndex(identities)
        self._selections: dict[Peer, frozenset[int]] = {}
        #: cached peers by anchor (None: peers without one, tested on every new identity)
        self._peers_by_anchor: dict[tuple[str, str] | None, set[Peer]] = {}

    def selections(self, peer: Peer) -> frozenset[int]:
        got = self._selections.get(peer)
        if got is None:
            if peer.wildcard:
                got = frozenset({IDENTITY_ANY})
            else:
                got = frozenset(i.id for i in self.index.candidates(peer) if peer.matches(i))
                self._peers_by_anchor.setdefault(peer_anchor(peer), set()).add(peer)
            self._selections[peer] = got
        return got

    def update(self, added: list[Identity], removed: list[Identity]) -> set[Peer]:
        """Apply identity changes; return the peers whose selections changed. Only peers
        that can select an added identity (by anchor) are tested against it."""
        self.index.apply(added, removed)
        changed: set[Peer] = set()
        gone = {i.id for i in removed}
        if gone:
            for peer, current in list(self._selections.items()):
                if gone & current and not peer.wildcard:
                    self._selections[peer] = current - gone
                    changed.add(peer)
        for identity in added:
            candidates = set(self._peers_by_anchor.get(None, ()))
            for lb in identity.labels:
                candidates.update(self._peers_by_anchor.get((lb.key, lb.value), ()))
            for peer in candidates:
                current = self._selections[peer]
                if identity.id not in current and peer.matches(identity):
                    self._selections[peer] = current | {identity.id}
                    changed.add(peer)
        return changed

    def forget_unused(self, used: set[Peer]) -> None:
        for peer in list(self._selections):
            if peer not in used:
                del self._selections[peer]
                if not peer.wildcard:
                    self._peers_by_anchor.get(peer_anchor(peer), set()).discard(peer)

    def __len__(self) -> int:
        return len(self._selections)
