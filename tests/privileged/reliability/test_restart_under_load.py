"""Issue 15 item 1: agent restarts (alternating graceful stop/start and `kill -9` + start)
while a long iperf3 (another one when a loaded machine slows the restarts; a restart never
straddles two), a wrk loop, a keep-alive connection through a service VIP and one
through the L7 proxy run, and an intruder probes denied flows in a tight loop: no broken
connection, no policy leak, and the restarted agent adopts endpoints, identities and the
open connections' conntrack entries rather than rebuilding them.

CI runs 4 restarts; `make soak` runs 20 (PYLIUM_RESTARTS, PYLIUM_RESTART_HOLD seconds with
the agent up between restarts)."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.restart_load import run_restarts

RESTARTS = int(os.environ.get("PYLIUM_RESTARTS", "4"))
HOLD_S = float(os.environ.get("PYLIUM_RESTART_HOLD", "2"))


@pytest.mark.timeout(300 + 60 * RESTARTS)  # a restart takes up to ~15 s on a loaded machine
def test_restarts_under_load_break_nothing_leak_nothing_and_adopt_state():
    got = run_restarts(RESTARTS, HOLD_S)
    print("\nrestart-under-load:", json.dumps({k: v for k, v in got.items()
                                             if k not in ("timings", "watch")}))
    watch = got["watch"]
    print("timings:", got["timings"])
    assert got["restarts_outside_iperf3"] == 0, "a restart happened while no iperf3 ran"
    # no broken connection
    iperf = got["iperf3"]
    assert iperf["rc"] == 0 and not iperf["error"], iperf
    assert iperf["stalled_intervals"] == 0 and iperf["short_runs"] == 0, iperf
    assert got["wrk"]["requests"] > 0 and got["wrk"]["failed_runs"] == [], got["wrk"]
    for name in ("service", "l7"):
        seen = got[name]
        assert seen["errors"] == [] and seen["ok"] > 10 * RESTARTS, (name, seen)
    # the L7 proxy enforced throughout (403 for the denied path on the kept-alive connection)
    assert got["l7"]["leaks"] == 0 and got["l7"]["denied"] > 0, got["l7"]
    # no policy leak: not one probe of a denied flow got an answer, and the datapath
    # counted every probe's SYN as a policy drop
    deny = got["deny"]
    assert deny["leaks"] == 0, deny
    assert deny["attempts"] > 20 * RESTARTS, deny
    assert got["policy_drops"] >= deny["attempts"], (got["policy_drops"], deny)
    # programs re-attached by replacing them in place: never a hook without one
    events = watch["tc_events"]
    assert events["deletions"] == [] and events["errors"] == [], events
    assert events["new_filters"] >= 2 * len(watch["endpoints"]) * RESTARTS, events
    assert all(s["missing_prog"] == 0 and s["missing_policy"] == 0
               for s in watch["endpoints"].values()), watch["endpoints"]
    assert watch["pinned_before"] == watch["pinned_after"], watch
    # state adopted, not rebuilt: and one regeneration per start, not a second one when
    # the L7 component notices "new" proxy ports a second later
    assert got["extra_regenerations"] == 0, got["extra_regenerations"]
    assert all(got["ports"][k] for k in ("iperf3", "service", "l7")), got["ports"]
    assert got["ct_entries_watched"] >= 4, got
    assert got["state_problems"] == [], got["state_problems"]
