"""The identities this node knows, by number and by label set: reserved ones always,
allocated ones as the allocator (or the KV-store watch) reports them, and node-local CIDR
identities created on demand for the CIDR prefixes policies name.

Listeners hear about every identity added or removed; the policy engine is one."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from pylium.identity.labels import LabelSet
from pylium.identity.model import (
    IDENTITY_WORLD,
    LOCAL_SCOPE,
    MAX_LOCAL,
    RESERVED_IDENTITIES,
    Identity,
    Network,
    cidr_labels,
)

Listener = Callable[[list[Identity], list[Identity]], None]


class IdentityCache:
    def __init__(self, identities: Iterable[Identity] = ()):
        self._by_id: dict[int, Identity] = dict(RESERVED_IDENTITIES)
        self._by_labels: dict[LabelSet, Identity] = {
            i.labels: i for i in RESERVED_IDENTITIES.values()}
        self._by_prefix: dict[Network, Identity] = {}
        self._next_local = LOCAL_SCOPE
        self._listeners: list[Listener] = []
        #: increases on every add/remove (indexes built from the cache compare it)
        self.generation = 0
        for identity in identities:
            self.add(identity)

    # queries ---------------------------------------------------------------------------
    def get(self, number: int) -> Identity | None:
        return self._by_id.get(number)

    def by_labels(self, labels: LabelSet) -> Identity | None:
        return self._by_labels.get(LabelSet(labels))

    def all(self) -> list[Identity]:
        return sorted(self._by_id.values(), key=lambda i: i.id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, number: int) -> bool:
        return number in self._by_id

    def for_ip(self, address: str) -> Identity:
        """The identity of an address outside the cluster: the longest CIDR identity
        containing it (what the ipcache answers), else world."""
        ip = ipaddress.ip_address(address)
        best: Identity | None = None
        for prefix, identity in self._by_prefix.items():
            if prefix.version == ip.version and ip in prefix and (
                    best is None or prefix.prefixlen > best.cidr.prefixlen):
                best = identity
        return best or self._by_id[IDENTITY_WORLD]

    # changes ---------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, added: list[Identity], removed: list[Identity]) -> None:
        self.generation += 1
        if added or removed:
            for listener in list(self._listeners):
                listener(added, removed)

    def add(self, identity: Identity) -> bool:
        """Add (or confirm) an identity; True if it is new."""
        known = self._by_id.get(identity.id)
        if known is not None:
            if known.labels != identity.labels:
                raise ValueError(f"identity {identity.id} is already {known.labels!r}")
            return False
        self._by_id[identity.id] = identity
        self._by_labels[identity.labels] = identity
        if identity.cidr is not None:
            self._by_prefix[identity.cidr] = identity
        self._notify([identity], [])
        return True

    def remove(self, number: int) -> Identity | None:
        identity = self._by_id.get(number)
        if identity is None or identity.reserved:
            return None
        del self._by_id[number]
        self._by_labels.pop(identity.labels, None)
        if identity.cidr is not None:
            self._by_prefix.pop(identity.cidr, None)
        self._notify([], [identity])
        return identity

    def cidr_identity(self, prefix: str | Network) -> Identity:
        """The local CIDR identity of `prefix`, created on first use (1<<24 range)."""
        network = ipaddress.ip_network(prefix, strict=False)
        if network.prefixlen == 0:
            return self._by_id[IDENTITY_WORLD]  # the whole address space is world
        known = self._by_prefix.get(network)
        if known is not None:
            return known
        while self._next_local in self._by_id:
            self._next_local += 1
        if self._next_local > MAX_LOCAL:
            raise RuntimeError("local CIDR identity space exhausted")
        identity = Identity(self._next_local, cidr_labels(network), network)
        self._next_local += 1
        self.add(identity)
        return identity
