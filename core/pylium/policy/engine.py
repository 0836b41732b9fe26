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

import itertools
from collections.abc import Callable, Mapping

import attrs

from pylium.identity.cache import IdentityCache
from pylium.identity.model import Identity
from pylium.policy.mapstate import EndpointPolicy
from pylium.policy.repository import PolicyRepository, RepositoryChange
from pylium.policy.resolve import (
    ENFORCEMENT_MODES,
    ContributionMemo,
    NamedRule,
    cidr_prefixes,
    compute,
    subject_selects,
)
from pylium.policy.selectorcache import Peer, SelectorCache, selector_anchor


@attrs.frozen
class PolicyChange:
    revision: int
    #: identity numbers whose policy may have changed
    identities: frozenset[int]


Subscriber = Callable[[PolicyChange], None]
NamedPorts = tuple[tuple[str, int], ...]


#: a rule's subject: (endpointSelector, nodeSelector); rules sharing one are tested once
Subject = tuple
Anchor = tuple[str, str] | None


def _subject(nr: NamedRule) -> Subject:
    return (nr.rule.endpoint_selector, nr.rule.node_selector)


def _subject_anchor(subject: Subject) -> Anchor:
    """A (key, value) every identity the subject selects carries (see `selector_anchor`)."""
    return selector_anchor(subject[0] if subject[0] is not None else subject[1])


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
        #: rules grouped by subject, and the subjects by anchor: an identity is tested only
        #: against the subjects its own labels can satisfy (and the unanchored ones)
        self._by_subject: dict[Subject, list[NamedRule]] = {}
        self._by_anchor: dict[Anchor, dict[Subject, None]] = {}
        #: a rank per rule (by name, then arrival) so each identity's rules come in one
        #: order whatever order their subjects were found in
        self._rank: dict[int, tuple] = {}
        self._arrival = itertools.count()
        #: (the selecting rules' ids, named ports) → (rules, policy, peers used): identities
        #: selected by the same rules have the same map state (their keys name peers, not
        #: the subject), so it is computed once for all of them
        self._shared: dict[tuple, tuple[tuple[NamedRule, ...], EndpointPolicy, set[Peer]]] = {}
        #: each live rule's contributions (`resolve.contributions`), dropped with the rule
        self._contributions: ContributionMemo = {}
        self._add_rules(repository.rules())
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
        ports: NamedPorts = tuple(sorted(named_ports.items())) if named_ports else ()
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
        revision = self.repository.revision
        shape = (tuple(map(id, rules)), ports)
        shared = self._shared.get(shape)
        if shared is None:
            policy, used = compute(rules, ident.labels, self.selectors.selections, self.mode,
                                   dict(ports), revision, preselected=True,
                                   memo=self._contributions)
            # the entry holds the rules, so their ids in `shape` cannot be reused meanwhile
            self._shared[shape] = (tuple(rules), policy, used)
        else:
            _, policy, used = shared
            if policy.revision != revision:
                policy = attrs.evolve(policy, revision=revision)
        self._cache[(number, ports)] = (policy, used)
        return policy

    def _rules_selecting(self, identity: Identity) -> list[NamedRule]:
        """Rules whose subject selector matches; each candidate subject is tested once."""
        labels = identity.labels
        candidates = dict(self._by_anchor.get(None, {}))
        for lb in labels:
            found = self._by_anchor.get((lb.key, lb.value))
            if found:
                candidates.update(found)
        out: list[NamedRule] = []
        for subject in candidates:
            group = self._by_subject[subject]
            if subject_selects(subject[0], subject[1], labels):
                out += group
        out.sort(key=lambda nr: self._rank[id(nr)])
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
        if len(self._shared) > 2 * len(self._cache) + 64:  # drop shapes no identity has
            live = {id(policy_used[1]) for policy_used in self._cache.values()}
            self._shared = {k: v for k, v in self._shared.items() if id(v[2]) in live}
        if numbers:
            change = PolicyChange(self.repository.revision, frozenset(numbers))
            for subscriber in list(self._subscribers):
                subscriber(change)

    def _ensure_cidr_identities(self, rules: list[NamedRule]) -> None:
        for prefix in sorted(cidr_prefixes(rules)):
            self.identities.cidr_identity(prefix)

    def _add_rules(self, rules: list[NamedRule] | tuple[NamedRule, ...]) -> None:
        for nr in rules:
            subject = _subject(nr)
            group = self._by_subject.get(subject)
            if group is None:
                group = self._by_subject[subject] = []
                self._by_anchor.setdefault(_subject_anchor(subject), {})[subject] = None
            group.append(nr)
            self._rank[id(nr)] = (nr.name, next(self._arrival))

    def _remove_rules(self, rules: tuple[NamedRule, ...]) -> None:
        for nr in rules:
            subject = _subject(nr)
            group = self._by_subject.get(subject, [])
            # the repository hands back the objects it announced; else drop an equal one
            at = next((i for i, m in enumerate(group) if m is nr), None)
            if at is None:
                at = next((i for i, m in enumerate(group) if m == nr), None)
            if at is not None:
                member = group.pop(at)
                self._rank.pop(id(member), None)
                self._contributions.pop(id(member), None)
            if not group and subject in self._by_subject:
                del self._by_subject[subject]
                self._by_anchor.get(_subject_anchor(subject), {}).pop(subject, None)

    def _selected_by(self, subject: Subject) -> set[int]:
        """The identities a subject selects, from the identity index's candidates."""
        return {i.id for i in self.selectors.index.with_anchor(_subject_anchor(subject))
                if subject_selects(subject[0], subject[1], i.labels)}

    def _on_rules(self, change: RepositoryChange) -> None:
        self._remove_rules(change.removed)
        self._add_rules(change.added)
        self._ensure_cidr_identities(list(change.added))
        touched = {_subject(nr) for nr in list(change.removed) + list(change.added)}
        affected: set[int] = set()
        for subject in touched:
            affected |= self._selected_by(subject)
        for number in affected:
            self._selecting.pop(number, None)
        self._invalidate(affected)

    def _on_identities(self, added: list[Identity], removed: list[Identity]) -> None:
        changed = self.selectors.update(added, removed)
        if changed:
            self._shared = {k: v for k, v in self._shared.items() if not v[2] & changed}
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
        self._shared.clear()
        self._invalidate(everyone)
