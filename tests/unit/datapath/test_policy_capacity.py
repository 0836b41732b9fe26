"""The Python side's idea of a policy map's size is the C one (bpf/lib/policy.h)."""

from __future__ import annotations

import re
from pathlib import Path

from pylium.datapath.maps.policy import POLICY_ENTRIES_MAX, entries_needed
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey

HEADER = Path(__file__).resolve().parents[3] / "bpf" / "lib" / "policy.h"


def test_policy_entries_max_matches_the_c_define():
    found = re.search(r"#define POLICY_ENTRIES_MAX (\d+)", HEADER.read_text())
    assert found and int(found.group(1)) == POLICY_ENTRIES_MAX


def test_entries_needed_counts_the_meta_entry():
    policy = EndpointPolicy(True, False, {PolicyKey(300, Direction.INGRESS): PolicyEntry(),
                                          PolicyKey(301, Direction.INGRESS): PolicyEntry()})
    assert entries_needed(policy) == 3
    assert entries_needed(EndpointPolicy(True, True, {})) == 1
