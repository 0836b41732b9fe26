"""Cluster-wide identity allocation through the KV store, safe with many nodes at once.

Layout under `pylium/state/identities/v1/` (Cilium's kvstore allocator, simplified):

* `id/<number>`      → the label set (JSON list); created with create-if-absent, so one
                       number never names two label sets;
* `value/<labels>`   → the number; created with create-if-absent, so one label set never
                       gets two numbers (a node that loses the race drops its `id/` key and
                       takes the winner's number);
* `refs/<number>/<node>` → empty, written under the node's lease: which nodes use it.

`release` drops the node's reference; `collect_garbage` deletes numbers nobody references.

Why garbage collection cannot delete a number in use (the fence): an allocation writes its
reference first and then *touches* `id/<number>` (a compare-and-swap that rewrites the same
label set, bumping its mod revision); it only returns the number once the touch succeeded.
The collector lists `id/` first, then the references, and deletes `id/<number>` only by
compare-and-delete at the revision it listed. So either the touch came before the
collector's listing — then the reference did too and the collector sees it — or after it —
then the collector's delete fails — or the collector deleted first — then the touch fails
and the allocation starts over. Index entries (`value/`) naming a deleted number are
dropped by whoever finds them. `restore` puts back the keys of an identity this node still
uses after they were lost (its lease expired during a KV-store outage and another node
collected the number): same number, or — if the label set got a new number meanwhile — the
caller learns that number."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from urllib.parse import quote

from pylium.api.kvstore import KVStore, Lease
from pylium.documents import RecordError, load_record
from pylium.errors import UserError
from pylium.identity.labels import LabelSet, parse_label
from pylium.identity.model import MAX_ALLOCATED, MIN_ALLOCATED, RESERVED_IDENTITIES, Identity

log = logging.getLogger(__name__)

IDENTITY_PREFIX = "pylium/state/identities/v1/"
ID_PREFIX = IDENTITY_PREFIX + "id/"
VALUE_PREFIX = IDENTITY_PREFIX + "value/"
REFS_PREFIX = IDENTITY_PREFIX + "refs/"
#: how many free numbers a claim that lost a race picks from at random
CLAIM_SPREAD = 64


class AllocationError(RuntimeError):
    pass


def _value_key(labels: LabelSet) -> str:
    return VALUE_PREFIX + quote(labels.key_string(), safe="")


def encode_labels(labels: LabelSet) -> bytes:
    return json.dumps(labels.sorted_strings()).encode()


def decode_labels(raw: bytes) -> LabelSet:
    """The label set of an identity record; `RecordError` for anything else."""
    data = load_record(raw, "identity record")
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise RecordError("identity record: expected a list of label strings")
    try:
        return LabelSet(parse_label(text, "unspec") for text in data)
    except UserError as exc:
        raise RecordError(f"identity record: {exc}") from None


def decode_identity(key: str, raw: bytes) -> Identity:
    """An allocated identity from its `id/<number>` key and record; `RecordError` for a
    number outside the allocated range (a peer cannot redefine reserved identities)."""
    text = key[len(ID_PREFIX):]
    if not text.isascii() or not text.isdigit() or len(text) > 10 or \
            not MIN_ALLOCATED <= int(text) <= MAX_ALLOCATED:
        raise RecordError(f"{key}: not an allocated identity number")
    return Identity(int(text), decode_labels(raw))


def decode_index(raw: bytes) -> int | None:
    """The number a `value/` index entry names; None when it names none (a corrupt or
    hostile entry is then replaced, never trusted or raised on)."""
    text = raw.decode("ascii", "replace").strip()
    if text.isascii() and text.isdigit() and len(text) <= 10 and \
            MIN_ALLOCATED <= int(text) <= MAX_ALLOCATED:
        return int(text)
    return None


class IdentityAllocator:
    def __init__(self, kvstore: KVStore, node: str, lease: Lease | None = None,
                 min_id: int = MIN_ALLOCATED, max_id: int = MAX_ALLOCATED,
                 known: Callable[[], set[int]] | None = None):
        self.kvstore = kvstore
        #: numbers known in use elsewhere (the node's identity cache): never claimed anew
        self.known = known or set
        self.node = node
        self.lease = lease
        self.min_id = min_id
        self.max_id = max_id
        #: numbers this node holds (allocated or restored, not released) and allocations in
        #: flight per number: one reference key stands for all of them, so undoing a failed
        #: attempt must not delete the key another use of the same number still needs
        self._held: dict[int, LabelSet] = {}
        self._in_flight: dict[int, int] = {}

    async def lookup(self, labels: LabelSet) -> Identity | None:
        item = await self.kvstore.get(_value_key(LabelSet(labels)))
        number = decode_index(item.value) if item is not None else None
        return Identity(number, labels) if number is not None else None

    async def get(self, number: int) -> Identity | None:
        item = await self.kvstore.get(f"{ID_PREFIX}{number}")
        return Identity(number, decode_labels(item.value)) if item is not None else None

    async def list(self) -> list[Identity]:
        """Every readable allocated identity; unreadable records are logged and skipped."""
        found = []
        for item in await self.kvstore.list(ID_PREFIX):
            try:
                found.append(decode_identity(item.key, item.value))
            except RecordError as exc:
                log.warning("ignoring unreadable identity record: %s", exc)
        return sorted(found, key=lambda i: i.id)

    async def _ref(self, number: int) -> None:
        await self.kvstore.put(f"{REFS_PREFIX}{number}/{self.node}", b"", lease=self.lease)

    async def _attempt(self, number: int, labels: LabelSet) -> bool:
        """Reference `number` and fence it for `labels`; on failure take the reference back
        unless another use of the number on this node still needs it."""
        self._in_flight[number] = self._in_flight.get(number, 0) + 1
        try:
            await self._ref(number)
            if await self._touch(number, labels):
                return True
        finally:
            self._in_flight[number] -= 1
            if not self._in_flight[number]:
                del self._in_flight[number]
        await self._unref(number)
        return False

    async def _unref(self, number: int) -> None:
        if number not in self._held and number not in self._in_flight:
            await self.kvstore.delete(f"{REFS_PREFIX}{number}/{self.node}")

    async def allocate(self, labels: LabelSet) -> Identity:
        """The cluster-wide identity of `labels`, allocating it if new; this node now
        references it."""
        labels = LabelSet(labels)
        for reserved in RESERVED_IDENTITIES.values():
            if reserved.labels == labels:
                return reserved
        value_key = _value_key(labels)
        for _attempt in range(64):
            item = await self.kvstore.get(value_key)
            if item is None:
                number = await self._claim_number(labels)
                if not await self._attempt(number, labels):
                    continue  # collected before we fenced it: again
                if await self.kvstore.create(value_key, str(number).encode()):
                    self._held[number] = labels
                    return Identity(number, labels)
                # another node won the label set: give our number back, use theirs
                await self._unref(number)
                await self._drop_id(number)
                continue
            number = decode_index(item.value)
            if number is not None and self._held.get(number) == labels:
                # already referenced and fenced by this node: the collector cannot take a
                # number while our reference stands, so no new reference or touch is needed
                return Identity(number, labels)
            if number is not None and await self._attempt(number, labels):
                self._held[number] = labels
                return Identity(number, labels)
            # the index names a number that was collected (or reused), or no number at all:
            # drop the index
            await self.kvstore.compare_and_delete(value_key, item.mod_revision)
        raise AllocationError(f"could not allocate an identity for {labels!r}")

    async def _touch(self, number: int, labels: LabelSet) -> bool:
        """Bump `id/<number>`'s revision if it still names `labels` (the fence against a
        concurrent garbage collection, see the module docstring); False if it does not."""
        key = f"{ID_PREFIX}{number}"
        for _attempt in range(64):
            held = await self.kvstore.get(key)
            if held is None or decode_labels(held.value) != labels:
                return False
            if await self.kvstore.compare_and_swap(key, held.mod_revision, held.value):
                return True
        raise AllocationError(f"identity {number} keeps changing; giving up")

    async def _claim_number(self, labels: LabelSet) -> int:
        """The lowest free number; after losing a race for one, a random one among the
        next free ones (many nodes allocating at once would otherwise all fight over the
        same lowest number, one winner per round)."""
        used = {int(i.key[len(ID_PREFIX):]) for i in await self.kvstore.list(ID_PREFIX)}
        used |= self.known()
        encoded = encode_labels(labels)
        collisions = 0
        while True:
            free = []
            number = self.min_id
            while number <= self.max_id and len(free) < CLAIM_SPREAD:
                if number not in used:
                    free.append(number)
                number += 1
            if not free:
                raise AllocationError("identity space exhausted")
            number = free[0] if not collisions else random.choice(free)
            if await self.kvstore.create(f"{ID_PREFIX}{number}", encoded):
                return number
            used.add(number)  # someone took it meanwhile
            collisions += 1

    async def _drop_id(self, number: int) -> None:
        item = await self.kvstore.get(f"{ID_PREFIX}{number}")
        if item is not None:
            await self.kvstore.compare_and_delete(f"{ID_PREFIX}{number}", item.mod_revision)

    async def release(self, identity: Identity | int) -> None:
        """This node no longer uses the identity (it stays until garbage-collected)."""
        number = identity.id if isinstance(identity, Identity) else identity
        self._held.pop(number, None)
        await self._unref(number)

    async def restore(self, identity: Identity) -> Identity:
        """Re-reference an identity this node uses, re-creating its keys if they were
        collected meanwhile. Returns the identity the label set has now (normally the same)."""
        if identity.reserved:
            return identity
        labels = LabelSet(identity.labels)
        value_key = _value_key(labels)
        await self.kvstore.create(f"{ID_PREFIX}{identity.id}", encode_labels(labels))
        if not await self._attempt(identity.id, labels):
            # the number went to another label set while we were away
            return await self.allocate(labels)
        if not await self.kvstore.create(value_key, str(identity.id).encode()):
            item = await self.kvstore.get(value_key)
            if item is not None and decode_index(item.value) != identity.id:
                await self._unref(identity.id)
                return await self.allocate(labels)
        self._held[identity.id] = labels
        return identity

    async def all_references(self) -> dict[int, list[str]]:
        """Identity number → the nodes referencing it (one list of the store)."""
        refs: dict[int, list[str]] = {}
        for item in await self.kvstore.list(REFS_PREFIX):
            number, _, node = item.key[len(REFS_PREFIX):].partition("/")
            if number.isdigit():
                refs.setdefault(int(number), []).append(node)
        return refs

    async def references(self, number: int) -> list[str]:
        prefix = f"{REFS_PREFIX}{number}/"
        return [i.key[len(prefix):] for i in await self.kvstore.list(prefix)]

    async def collect_garbage(self, only: set[int] | None = None) -> list[int]:
        """Delete identities no node references (of `only`, if given); returns the numbers
        deleted. Safe while other nodes allocate or collect at the same time: `id/` is
        listed before the references and deleted only at the revision listed (the fence in
        the module docstring)."""
        identities = await self.kvstore.list(ID_PREFIX)
        referenced = await self.all_references()
        deleted: list[int] = []
        for item in identities:
            number = int(item.key[len(ID_PREFIX):])
            if number in referenced or (only is not None and number not in only):
                continue
            before_delete = await self.kvstore.revision()
            if not await self.kvstore.compare_and_delete(item.key, item.mod_revision):
                continue  # touched (someone started using it) or collected by another node
            deleted.append(number)
            try:
                value_key = _value_key(decode_labels(item.value))
            except RecordError as exc:
                log.warning("collected unreadable identity %d: %s", number, exc)
                continue
            index = await self.kvstore.get(value_key)
            # only the index entry of the number just deleted: once it is gone, another node
            # may re-claim the same number for the same label set and write a fresh entry
            if (index is not None and decode_index(index.value) == number
                    and index.mod_revision <= before_delete):
                await self.kvstore.compare_and_delete(value_key, index.mod_revision)
        return deleted
