"""The conntrack GC's interval adapts to how full the table is after each collection."""

from __future__ import annotations

from pylium.datapath.component import CT_GC_MIN_INTERVAL_S, next_gc_interval


def test_a_filling_table_is_collected_sooner_down_to_the_floor():
    interval = 30.0
    seen = []
    for _ in range(8):
        interval = next_gc_interval(interval, fill=0.6, longest=30.0)
        seen.append(interval)
    assert seen[:3] == [15.0, 7.5, 3.75]
    assert min(seen) == CT_GC_MIN_INTERVAL_S == seen[-1]


def test_a_nearly_empty_table_relaxes_back_to_the_longest_and_between_it_holds():
    assert next_gc_interval(2.0, fill=0.01, longest=30.0) == 4.0
    assert next_gc_interval(20.0, fill=0.0, longest=30.0) == 30.0
    assert next_gc_interval(8.0, fill=0.1, longest=30.0) == 8.0
