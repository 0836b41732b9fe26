"""The incremental policy engine: per-identity map states, kept up to date.

Endpoints with the same labels share an identity and so a policy (Cilium's SelectorPolicy
per identity); the engine caches one `EndpointPolicy` per (identity, named ports) and
recomputes only what a change can affect:

* a policy added/removed → the identities its rules' endpointSelectors select;
* an identity added/removed → the peers (selector cache) whose selections changed → the
  cached identities whose policy uses those peers.

Subscribers get a `PolicyChange` naming the identities to regenerate; the endpoint manager
then calls `endpoint_policy(identity, named_ports)` for its endpoints with those ids."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from pylium.identity.cache import IdentityCache
from pylium.identity.model import Identity
from pylium.policy.mapstate import EndpointPolicy
from pylium.policy.repository import PolicyRepository, RepositoryChange
from pylium.policy.resolve import ENFORCEMENT_MODES, NamedRule, cidr_prefixes, compute, rule_selects
from pylium.policy.selectorcache import Peer, SelectorCache


@attrs.frozen
class PolicyChange:
    revision: int
    #: identity numbers whose policy may have changed
    identities: frozenset[int]


Subscriber = Callable[[PolicyChange], None]
NamedPorts = tuple[tuple[str, int], ...]


class PolicyEngine:
    def __init__(self, repository: PolicyRepository, identities: IdentityCache,
                 mode: str = "default"):
        if mode not in ENFORCEMENT_MODES:
            raise ValueError(f"enforcement mode {mode!r} is not one of {ENFORCEMENT_MODES}")
        self.repository = repository
        self.identities = identities
        self.mode = mode
        self.selectors = SelectorCache(identities)
        self._cache: dict[tuple[int, NamedPorts], tuple[EndpointPolicy, set[Peer]]] = {}
        #: identity → the rules selecting it (rebuilt lazily per identity)
        self._selecting: dict[int, list[NamedRule]] = {}
        self._subscribers: list[Subscriber] = []
        #: rules grouped by their subject selector (None = rebuild)
        self._by_subject: dict | None = None
        self._ensure_cidr_identities(repository.rules())
        self._unsubs = [repository.subscribe(self._on_rules),
                        identities.subscribe(self._on_identities)]

    def close(self) -> None:
        for unsub in self._unsubs:
            unsub()

    # queries --------------------------------------------------------------------------
    def endpoint_policy(self, identity: int | Identity,
                        named_ports: Mapping[str, int] | None = None) -> EndpointPolicy:
        """The map state for an endpoint of `identity` (which must be known)."""
        number = identity.id if isinstance(identity, Identity) else identity
        ports: NamedPorts = tuple(sorted((named_ports or {}).items()))
        cached = self._cache.get((number, ports))
        if cached is not None:
            return cached[0]
        ident = self.identities.get(number)
        if ident is None:
            raise KeyError(f"identity {number} is not known")
        rules = self._selecting.get(number)
        if rules is None:
            rules = self._rules_selecting(ident)
            self._selecting[number] = rules
        policy, used = compute(rules, ident.labels, self.selectors.selections, self.mode,
                               dict(ports), self.repository.revision)
        self._cache[(number, ports)] = (policy, used)
        return policy

    def _rules_selecting(self, identity: Identity) -> list[NamedRule]:
        """Rules whose subject selector matches; each distinct selector is tested once."""
        if self._by_subject is None:
            self._by_subject = {}
            for nr in self.repository.rules():
                subject = (nr.rule.endpoint_selector, nr.rule.node_selector)
                self._by_subject.setdefault(subject, []).append(nr)
        out: list[NamedRule] = []
        for group in self._by_subject.values():
            if rule_selects(group[0].rule, identity.labels):
                out += group
        return out

    def cached_identities(self) -> set[int]:
        return {number for number, _ in self._cache}

    # changes --------------------------------------------------------------------------
    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def _invalidate(self, numbers: set[int]) -> None:
        for key in [k for k in self._cache if k[0] in numbers]:
            del self._cache[key]
        if numbers:
            change = PolicyChange(self.repository.revision, frozenset(numbers))
            for subscriber in list(self._subscribers):
                subscriber(change)

    def _ensure_cidr_identities(self, rules: list[NamedRule]) -> None:
        for prefix in sorted(cidr_prefixes(rules)):
            self.identities.cidr_identity(prefix)

    def _on_rules(self, change: RepositoryChange) -> None:
        self._by_subject = None
        self._ensure_cidr_identities(list(change.added))
        touched = {(nr.rule.endpoint_selector, nr.rule.node_selector): nr.rule
                   for nr in list(change.removed) + list(change.added)}
        affected = {i.id for i in self.identities
                    if any(rule_selects(rule, i.labels) for rule in touched.values())}
        for number in affected:
            self._selecting.pop(number, None)
        self._invalidate(affected)

    def _on_identities(self, added: list[Identity], removed: list[Identity]) -> None:
        changed = self.selectors.update(added, removed)
        affected = {number for (number, _), (_, used) in self._cache.items()
                    if used & changed}
        for identity in removed:
            self._selecting.pop(identity.id, None)
            affected.add(identity.id)
        self._invalidate(affected)

    def set_mode(self, mode: str) -> None:
        if mode not in ENFORCEMENT_MODES:
            raise ValueError(f"enforcement mode {mode!r} is not one of {ENFORCEMENT_MODES}")
        self.mode = mode
        everyone = self.cached_identities()
        self._cache.clear()
        self._invalidate(everyone)
