"""The policy repository: every imported policy, a revision that increases on each change,
and subscribers told which rules came and went. `PolicyStore` persists it in the KV store
under `pylium/state/policies/` so an agent restart keeps what was imported."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import attrs

from pylium.api.kvstore import KVStore
from pylium.documents import RecordError, load_record
from pylium.errors import UserError
from pylium.policy.load import from_source
from pylium.policy.resolve import NamedRule, named_rules
from pylium.policy.rule import Policy

log = logging.getLogger(__name__)

POLICY_PREFIX = "pylium/state/policies/"

PolicyId = tuple[str, str, str]  # (kind, namespace, name)


@attrs.frozen
class RepositoryChange:
    revision: int
    removed: tuple[NamedRule, ...]
    added: tuple[NamedRule, ...]


Subscriber = Callable[[RepositoryChange], None]


def policy_id(policy: Policy) -> PolicyId:
    return (policy.kind, policy.namespace, policy.name)


class PolicyRepository:
    def __init__(self) -> None:
        self._policies: dict[PolicyId, Policy] = {}
        self._rules: dict[PolicyId, list[NamedRule]] = {}
        self.revision = 0
        self._subscribers: list[Subscriber] = []

    # reads ---------------------------------------------------------------------------
    def policies(self) -> list[Policy]:
        return [self._policies[k] for k in sorted(self._policies)]

    def rules(self) -> list[NamedRule]:
        return [nr for k in sorted(self._rules) for nr in self._rules[k]]

    def __len__(self) -> int:
        return len(self._policies)

    def find(self, name: str, namespace: str | None = None,
             kind: str | None = None) -> list[Policy]:
        """Policies called `name` (or `namespace/name`), optionally of one namespace/kind."""
        if namespace is None and "/" in name:
            namespace, name = name.split("/", 1)
        return [p for k, p in sorted(self._policies.items())
                if p.name == name and (namespace is None or p.namespace == namespace)
                and (kind is None or p.kind == kind)]

    # changes ---------------------------------------------------------------------------
    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def _commit(self, removed: list[NamedRule], added: list[NamedRule]) -> int:
        self.revision += 1
        change = RepositoryChange(self.revision, tuple(removed), tuple(added))
        for subscriber in list(self._subscribers):
            subscriber(change)
        return self.revision

    def add(self, policies: Iterable[Policy]) -> int:
        """Add policies, replacing any with the same (kind, namespace, name)."""
        removed: list[NamedRule] = []
        added: list[NamedRule] = []
        for policy in policies:
            pid = policy_id(policy)
            removed += self._rules.pop(pid, [])
            self._policies[pid] = policy
            self._rules[pid] = named_rules([policy])
            added += self._rules[pid]
        return self._commit(removed, added)

    def _remove(self, pids: Iterable[PolicyId]) -> list[Policy]:
        gone: list[Policy] = []
        removed: list[NamedRule] = []
        for pid in list(pids):
            gone.append(self._policies.pop(pid))
            removed += self._rules.pop(pid)
        if gone:
            self._commit(removed, [])
        return gone

    def delete(self, name: str, namespace: str | None = None,
               kind: str | None = None) -> list[Policy]:
        found = self.find(name, namespace, kind)
        if not found:
            where = f" in namespace {namespace}" if namespace else ""
            raise UserError(f"no policy named {name!r}{where}")
        return self._remove(policy_id(p) for p in found)

    def delete_by_labels(self, labels: Iterable[str]) -> list[Policy]:
        """Delete the policies with a rule carrying every one of `labels` (`key=value`)."""
        wanted = set(labels)
        return self._remove(pid for pid, p in self._policies.items()
                            if any(wanted <= {str(lb) for lb in r.labels} for r in p.rules))

    def delete_all(self) -> list[Policy]:
        return self._remove(list(self._policies))


def decode_record(key: str, raw: bytes) -> list[Policy]:
    """The policies of one stored record; `RecordError` for anything that is not one (a
    record written by another version or a hostile peer is skipped, never fatal)."""
    record = load_record(raw, f"policy record {key}")
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str) or \
            not isinstance(record.get("name"), str):
        raise RecordError(f"policy record {key}: expected an object with kind, name, source")
    try:
        return from_source(record["kind"], record["name"], record.get("source"))
    except UserError as exc:
        raise RecordError(f"policy record {key}: {exc}") from None


def _key(policy: Policy) -> str:
    return f"{POLICY_PREFIX}{policy.kind}/{policy.namespace or '_'}/{policy.name}"


class PolicyStore:
    """A repository backed by the KV store: changes are written first, then applied."""

    def __init__(self, repository: PolicyRepository, kvstore: KVStore | None):
        self.repository = repository
        self.kvstore = kvstore

    async def load(self) -> int:
        """Read every persisted policy into the repository; returns how many."""
        if self.kvstore is None:
            return 0
        policies: list[Policy] = []
        for item in await self.kvstore.list(POLICY_PREFIX):
            try:
                policies += decode_record(item.key, item.value)
            except RecordError as exc:
                log.error("skipping stored policy %s: %s", item.key, exc)
            except Exception as exc:  # a bad record must not stop the agent
                log.error("skipping stored policy %s: %s", item.key, exc)
        if policies:
            self.repository.add(policies)
        return len(policies)

    async def add(self, policies: list[Policy]) -> int:
        if self.kvstore is not None:
            for p in policies:
                record = {"kind": p.kind, "name": p.name, "namespace": p.namespace,
                          "source": p.source}
                await self.kvstore.put(_key(p), json.dumps(record).encode())
        return self.repository.add(policies)

    async def _forget(self, gone: list[Policy]) -> list[Policy]:
        if self.kvstore is not None:
            for p in gone:
                await self.kvstore.delete(_key(p))
        return gone

    async def delete(self, name: str, namespace: str | None = None) -> list[Policy]:
        return await self._forget(self.repository.delete(name, namespace))

    async def delete_by_labels(self, labels: list[str]) -> list[Policy]:
        return await self._forget(self.repository.delete_by_labels(labels))

    async def delete_all(self) -> list[Policy]:
        return await self._forget(self.repository.delete_all())
