"""Maglev tables: balanced, deterministic for one seed, and minimally disrupted when a
backend goes (the property that lets every node pick the same backend and keeps most
flows where they are)."""

from __future__ import annotations

import base64
import collections

import pytest
from pylium.errors import UserError
from pylium.lb import maglev


def names(n: int) -> list[str]:
    return [f"10.{i // 250}.{i % 250}.7:80/TCP" for i in range(n)]


def moved_fraction(before: list[str], after: list[str]) -> float:
    return sum(1 for x, y in zip(before, after, strict=True) if x != y) / len(before)


def table(backends: list[str], size: int, seed: str) -> list[str]:
    return [backends[i] for i in maglev.compute_table(backends, size, seed)]


# Maglev's round-robin fill shifts some slots between surviving backends too; how many
# depends on N and M/N. Measured (blake2b keyed by the seed, names as below):
#   N=10:  M=1021 -> ~1.2/N, M=16381 -> ~1.05/N
#   N=100: M=16381 -> ~2.3/N, M=32749 -> ~1.8/N, M=65521 -> ~1.56/N, M=131071 -> ~1.37/N
# This is the algorithm's own behaviour, not a bug of ours: the fill is the paper's
# (test_table_is_the_papers_populate below) and Cilium's pkg/maglev, backends are keyed by
# their stable "IP:PORT/PROTO" name, never by an index or id. The paper's Fig. 13 shows the
# same: near-minimal disruption needs M >> N. The 1.2/N holds for N=10 only; no
# Cilium table size (max 131071) reaches it for N=100.
@pytest.mark.parametrize("n,size,bound", [(10, 16381, 1.2), (100, 16381, 2.6),
                                          (100, 131071, 1.5)])
def test_removing_one_of_n_backends_moves_about_one_nth_of_the_slots(n, size, bound):
    seed = maglev.new_seed()
    backends = names(n)
    before = table(backends, size, seed)
    for gone in (0, n // 2, n - 1):
        rest = [b for b in backends if b != backends[gone]]
        after = table(rest, size, seed)
        moved = moved_fraction(before, after)
        # the slots the removed backend owned must move; little else may
        assert 1 / n * 0.9 <= moved <= bound / n, (n, gone, moved)
        assert backends[gone] not in after


def test_every_backend_owns_a_near_equal_share():
    counts = collections.Counter(table(names(10), 16381, maglev.new_seed()))
    assert len(counts) == 10
    assert max(counts.values()) - min(counts.values()) <= 1


def test_same_seed_same_table_whatever_the_order_different_seed_different_table():
    seed = maglev.new_seed()
    backends = names(7)
    assert table(backends, 1021, seed) == table(list(reversed(backends)), 1021, seed)
    assert table(backends, 1021, seed) != table(backends, 1021, maglev.new_seed())


def test_table_sizes_are_cilium_primes_only():
    assert len(maglev.compute_table(names(3), 251, maglev.new_seed())) == 251
    for bad in (250, 16384, 0, True, "16381"):
        with pytest.raises(UserError, match="must be one of"):
            maglev.compute_table(names(3), bad, "")
    assert maglev.compute_table([], 251, "") == []


def test_table_is_the_papers_populate():
    """Our fill is Eisenbud et al.'s Populate (Fig. 5 of the paper), written here from the
    paper's pseudo-code with explicit permutation lists: same offset/skip, same table."""
    seed, size = maglev.new_seed(), 1021
    backends = names(13)
    key = base64.b64decode(seed)
    ordered = sorted(backends)  # turns are taken in name order, whatever the input order
    permutation = []
    for name in ordered:
        offset, skip = maglev._offset_skip(name, size, key)
        permutation.append([(offset + j * skip) % size for j in range(size)])
    nxt, entry, n = [0] * len(ordered), [-1] * size, 0
    while n < size:
        for i in range(len(ordered)):
            c = permutation[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = permutation[i][nxt[i]]
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == size:
                break
    assert table(backends, size, seed) == [ordered[i] for i in entry]
