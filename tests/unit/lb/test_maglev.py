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


# STATELESS mode (maglev_mode: stateless, compute_table): Maglev's round-robin fill shifts
# some slots between surviving backends too; how many depends on N and M/N. Measured
# (blake2b keyed by the seed, names as below):
#   N=10:  M=1021 -> ~1.2/N, M=16381 -> ~1.05/N
#   N=100: M=16381 -> ~2.3/N, M=32749 -> ~1.8/N, M=65521 -> ~1.56/N, M=131071 -> ~1.37/N
# This is the algorithm's own behaviour, not a bug of ours: the fill is the paper's
# (test_table_is_the_papers_populate below) and Cilium's pkg/maglev, backends are keyed by
# their stable "IP:PORT/PROTO" name, never by an index or id. The paper's Fig. 13 shows the
# same: near-minimal disruption needs M >> N. The 1.2/N holds for N=10 only; no
# Cilium table size (max 131071) reaches it for N=100: that is why the default mode is
# minimal-disruption (tests below).
@pytest.mark.parametrize("n,size,bound", [(10, 16381, 1.2), (100, 16381, 2.6),
                                          (100, 131071, 1.5)])
def test_stateless_removing_one_of_n_backends_moves_about_one_nth_of_the_slots(n, size, bound):
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


# MINIMAL-DISRUPTION mode (the default, maglev.evolve) --------------------------------------
def share_bounds(table: maglev.MaglevTable) -> tuple[int, int]:
    counts = table.counts().values()
    return min(counts), max(counts)


def assert_balanced(table: maglev.MaglevTable) -> None:
    """The guarantee: every backend owns floor(M/N) or ceil(M/N) slots."""
    n = len(table.backends)
    low, high = share_bounds(table)
    assert table.size // n <= low <= high <= -(-table.size // n), (low, high)
    assert len(table.slots) == table.size


@pytest.mark.parametrize("n,size", [(10, 16381), (100, 16381), (100, 1021), (1000, 16381)])
def test_minimal_disruption_removing_or_adding_one_of_n_moves_at_most_1_2_over_n(n, size):
    """The issue's acceptance bound, 1.2/N, for removing one backend of N (and adding one
    back): only the removed backend's slots move, and balance holds after each step."""
    seed = maglev.new_seed()
    backends = names(n)
    first = maglev.evolve(None, backends, size, seed)
    assert first == maglev.populate(backends, size, seed)  # no history: plain Maglev
    assert_balanced(first)
    for gone in (0, n // 2, n - 1):
        rest = [b for b in backends if b != backends[gone]]
        after = maglev.evolve(first, rest, size, seed)
        assert_balanced(after)
        moved = moved_fraction(first.names(), after.names())
        assert 1 / n * 0.9 <= moved <= 1.2 / n, (n, gone, moved * n)
        # a flow on a surviving backend never moves
        assert all(x == y for x, y in zip(first.names(), after.names(), strict=True)
                   if x != backends[gone])
        back = maglev.evolve(after, backends, size, seed)
        assert_balanced(back)
        moved = moved_fraction(after.names(), back.names())
        assert moved <= 1.2 / n, (n, gone, moved * n)
        # the added backend only took slots: nothing moved between the others
        assert all(y == backends[gone] for x, y in zip(after.names(), back.names(),
                                                       strict=True) if x != y)


def test_minimal_disruption_over_a_long_history_stays_balanced_and_deterministic():
    """Many changes in a row (removals, additions, several at once, all gone and back):
    balance holds at every step and the same history gives the same table."""
    seed = maglev.new_seed()
    pool = names(40)
    steps = [pool[:10], pool[:9], pool[1:9], pool[1:20], pool[5:25], pool[:3], pool[:1],
             pool[30:40], pool[30:31] + pool[:10], pool]
    tables = []
    previous = None
    for backends in steps:
        previous = maglev.evolve(previous, backends, 4093, seed)
        assert set(previous.backends) == set(backends)
        assert_balanced(previous)
        tables.append(previous)
    previous = None
    for backends, expected in zip(steps, tables, strict=True):
        previous = maglev.evolve(previous, list(reversed(backends)), 4093, seed)
        assert previous == expected
    assert maglev.evolve(tables[-1], [], 4093, seed).slots == ()


def test_tables_round_trip_through_their_stored_form_and_bad_ones_are_refused():
    seed = maglev.new_seed()
    for n in (3, 300):  # 8- and 16-bit slot indexes
        table = maglev.evolve(None, names(n), 16381, seed)
        body = maglev.MaglevTable.decode(table.encode())
        assert body == table
    stored = maglev.evolve(None, names(10), 16381, seed).encode()
    assert len(stored["slots"]) < 12_000  # compact: ~4 bits a slot for 10 backends
    for bad in ({**stored, "size": 1000}, {**stored, "slots": "!!"},
                {**stored, "backends": stored["backends"][:5]},
                {**stored, "backends": stored["backends"][:1] * 10}, {"size": 16381}):
        with pytest.raises(UserError, match="maglev table"):
            maglev.MaglevTable.decode(bad)
