"""Maglev consistent hashing (Eisenbud et al., NSDI 2016).

Stateless (`compute_table`, `populate`; Cilium's `pkg/maglev`): each backend walks its own
permutation of the M table slots and claims the next free one in turn, so every backend
owns ~M/N slots. The permutation depends only on the backend's name, the table size and a
seed shared through the KV store, so every node computes the same table. But the
round-robin fill also shifts slots between surviving backends: removing one of 100
backends moves ~2.3/N of the flows at M=16381 (~1.37/N even at 131071).

Minimal-disruption (`evolve`, the default `maglev_mode`): the next table starts from the
previous one and moves only the slots it must (the removed backends' slots, and the
surplus of backends above their share when one is added): ~1/N. Its history is carried by
the table stored with the service in the KV store (`MaglevTable`), so every node still
installs the same table."""

from __future__ import annotations

import array
import base64
import hashlib
import secrets
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import attrs

from pylium.errors import UserError

#: the table sizes Cilium accepts (`--bpf-lb-maglev-table-size`): primes, so every skip
#: value is coprime with M and each permutation visits every slot
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381
SEED_BYTES = 12


def backend_name(ip: str, port: int, protocol: str) -> str:
    """A backend's name in the Maglev permutation and tables: the same on every node."""
    return f"{ip}:{port}/{protocol}"


def check_table_size(size: object) -> int:
    if isinstance(size, bool) or size not in TABLE_SIZES:
        raise UserError(f"maglev table size {size!r}: must be one of "
                        f"{', '.join(map(str, TABLE_SIZES))}")
    return int(size)  # type: ignore[arg-type]


def new_seed() -> str:
    """A random seed, base64 like Cilium's `--bpf-lb-maglev-hash-seed`."""
    return base64.b64encode(secrets.token_bytes(SEED_BYTES)).decode()


def _offset_skip(name: str, size: int, seed: bytes) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), key=seed, digest_size=16).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def compute_table(backends: Sequence[str], size: int = DEFAULT_TABLE_SIZE,
                  seed: str = "") -> list[int]:
    """The lookup table: `size` entries, each an index into `backends` (names that are
    stable across nodes, e.g. "10.200.1.5:80/TCP"). An empty backend list gives []."""
    size = check_table_size(size)
    if not backends:
        return []
    key = base64.b64decode(seed) if seed else b""
    names = sorted(set(backends))
    if len(names) != len(backends):
        raise UserError("maglev: backend names must be unique")
    index = {name: backends.index(name) for name in names}
    perms = [_offset_skip(name, size, key) for name in names]
    nexts = [0] * len(names)
    table = [-1] * size
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            j = nexts[i]
            slot = (offset + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = index[names[i]]
            nexts[i] = j + 1
            filled += 1
            if filled == size:
                return table


# minimal-disruption tables -------------------------------------------------------------
#: how a Maglev table evolves when the backend set changes
MODES = ("minimal-disruption", "stateless")
DEFAULT_MODE = "minimal-disruption"
MAX_BACKENDS = 0xFFFF  # slots are stored as 16-bit indexes


@attrs.frozen
class MaglevTable:
    """One service's table: `slots[i]` indexes `backends` (stable names, sorted).

    A minimal-disruption table depends on its history (the table it evolved from), which a
    node that joined later or missed an update cannot know. So it is never recomputed by
    each node: the node that writes the service (`ServiceStore.put`) evolves the stored
    table and stores the result with the service in the KV store; every node installs the
    stored table as it is (`encode`/`decode`: the slots as 8- or 16-bit indexes, zlib,
    base64: ~7 KB for 16381 slots and 10 backends). The same record after an agent restart
    gives the same table, so the agent keeps the pinned one."""

    size: int
    backends: tuple[str, ...]
    slots: tuple[int, ...] = attrs.field(repr=False)

    def names(self) -> list[str]:
        """The backend name of every slot."""
        return [self.backends[i] for i in self.slots]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.backends, 0)
        for i in self.slots:
            out[self.backends[i]] += 1
        return out

    def encode(self) -> dict[str, Any]:
        code = "B" if len(self.backends) <= 0x100 else "H"
        raw = array.array(code, self.slots)
        if code == "H" and sys.byteorder != "little":
            raw.byteswap()
        packed = base64.b64encode(zlib.compress(raw.tobytes(), 9)).decode()
        return {"size": self.size, "backends": list(self.backends), "slots": packed}

    @classmethod
    def decode(cls, body: Any) -> MaglevTable:
        """The stored form back; anything malformed raises `UserError` (never a table
        that names a backend out of range)."""
        try:
            size = check_table_size(body["size"])
            backends = tuple(body["backends"])
            if not backends or len(backends) > MAX_BACKENDS or not all(
                    isinstance(b, str) for b in backends) or len(set(backends)) != len(backends):
                raise ValueError("bad backend list")
            raw = zlib.decompress(base64.b64decode(body["slots"], validate=True))
            slots = array.array("B" if len(backends) <= 0x100 else "H")
            slots.frombytes(raw)
            if slots.typecode == "H" and sys.byteorder != "little":
                slots.byteswap()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"stored maglev table is malformed: {exc}") from None
        if len(slots) != size or (slots and max(slots) >= len(backends)):
            raise UserError("stored maglev table is malformed: slots do not match its size "
                            "or backends")
        return cls(size, backends, tuple(slots))


def populate(backends: Sequence[str], size: int = DEFAULT_TABLE_SIZE,
             seed: str = "") -> MaglevTable:
    """The stateless table (the paper's Populate) as a `MaglevTable`."""
    names = tuple(sorted(backends))
    if not names:
        return MaglevTable(check_table_size(size), (), ())
    # compute_table indexes the list it is given: here the sorted names
    return MaglevTable(size, names, tuple(compute_table(list(names), size, seed)))


def evolve(previous: MaglevTable | None, backends: Sequence[str],
           size: int = DEFAULT_TABLE_SIZE, seed: str = "") -> MaglevTable:
    """The table for `backends` that moves as few slots of `previous` as balance allows.

    Guarantee (tested): every backend owns floor(M/N) or ceil(M/N) of the M slots, as a
    stateless Maglev table does; a slot changes owner only if its backend left, or if its
    owner holds more than its share (then exactly the surplus moves). Removing one of N
    backends therefore moves only the removed backend's ~M/N slots; adding one moves the
    ~M/(N+1) slots it takes. Freed and surplus slots go to the backends below their share,
    which take turns (in name order, as in Populate), each walking its own Maglev
    permutation from the start and taking the first slot that is free or whose owner has a
    surplus: the slots a backend gains are the ones it prefers, as in plain Maglev.
    Deterministic for (previous, backends, size, seed). Without a usable previous table
    (none, another size, or no backend in common) this is the stateless table."""
    size = check_table_size(size)
    names = tuple(sorted(set(backends)))
    if len(names) != len(backends):
        raise UserError("maglev: backend names must be unique")
    if len(names) > MAX_BACKENDS:
        raise UserError(f"maglev: at most {MAX_BACKENDS} backends")
    if not names:
        return MaglevTable(size, (), ())
    if previous is None or previous.size != size or not set(previous.backends) & set(names):
        return populate(names, size, seed)
    index = {n: i for i, n in enumerate(names)}
    # previous owners, re-indexed into the new names (-1: the owner left)
    remap = [index.get(b, -1) for b in previous.backends]
    table = [remap[i] for i in previous.slots]
    counts = [0] * len(names)
    for owner in table:
        if owner >= 0:
            counts[owner] += 1
    quota, extra = divmod(size, len(names))
    # the ceil(M/N) shares go to the backends holding the most slots (fewest moves)
    target = [quota] * len(names)
    for i in sorted(range(len(names)), key=lambda i: (-counts[i], i))[:extra]:
        target[i] += 1
    surplus = [max(0, c - t) for c, t in zip(counts, target, strict=True)]
    need = [max(0, t - c) for c, t in zip(counts, target, strict=True)]
    key = base64.b64decode(seed) if seed else b""
    takers = [i for i in range(len(names)) if need[i]]
    perms = {i: _offset_skip(names[i], size, key) for i in takers}
    nexts = dict.fromkeys(takers, 0)
    while takers:
        for i in takers:
            offset, skip = perms[i]
            j = start = nexts[i]
            while True:
                slot = (offset + j * skip) % size
                owner = table[slot]
                j += 1
                if owner < 0 or (owner != i and surplus[owner]):
                    break
                if j - start > size:  # cannot happen: needs always equal free + surplus
                    raise AssertionError("maglev: no slot left to take")
            if owner >= 0:
                surplus[owner] -= 1
            table[slot] = i
            nexts[i] = j
            need[i] -= 1
        takers = [i for i in takers if need[i]]
    return MaglevTable(size, names, tuple(table))
