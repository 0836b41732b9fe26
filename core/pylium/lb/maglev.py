"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium's `pkg/maglev` uses
it: each backend walks its own permutation of the M table slots and claims the next free
one in turn, so every backend owns ~M/N slots and removing one backend re-maps only the
slots it owned (~1/N of flows). The permutation depends only on the backend's name, the
table size and a seed; with the seed shared through the KV store every node computes the
same table, so a flow picks the same backend whichever node it enters."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence

from pylium.errors import UserError

#: the table sizes Cilium accepts (`--bpf-lb-maglev-table-size`): primes, so every skip
#: value is coprime with M and each permutation visits every slot
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381
SEED_BYTES = 12


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
