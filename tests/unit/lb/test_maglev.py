"""Maglev tables: balanced, deterministic for one seed, and minimally disrupted when a
backend goes (the property that lets every node pick the same backend and keeps most
flows where they are)."""

from __future__ import annotations

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
# depends on M/N. Measured here: N=10, M=16381 -> ~1.05/N; N=100, M=16381 -> ~2.3/N;
# N=100, M=131071 -> ~1.37/N (the 1.2/N goal holds only for the first).
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
