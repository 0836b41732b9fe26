"""Issue 15 item 2 (Cilium #38998): an upgrade to a differently built endpoint object (a
changed define: the agent restarts with another SYN conntrack lifetime, which is compiled
into bpf_lxc.c) while traffic flows replaces the programs in place and keeps the maps.

Checked while the new agent compiles, loads and attaches the new object: the kernel's tc
notifications on the endpoints' veths show only replacements (no RTM_DELTFILTER, however
short the window), a sampler in the node's netns never sees a veth hook without a program or
an endpoint without its policy map (and every policy map it sees is complete); the pinned maps keep their ids (reused, never
re-created empty); a ping every 2 ms loses no more than an equal window without an upgrade
loses (the bound: what the kernel drops anyway, 0 on a quiet machine); iperf3, wrk and the
kept-alive service and L7 connections break nothing; a denied flow never passes."""

from __future__ import annotations

import json

import pytest

from tests.support.restart_load import run_upgrade


@pytest.mark.timeout(900)  # two ping windows sized from a measured restart, under load
def test_upgrade_to_a_new_object_swaps_programs_in_place_and_keeps_maps():
    got = run_upgrade({"ct_timeout_syn": 59})
    print("\nupgrade:", json.dumps({k: v for k, v in got.items() if k != "watch"}))
    watch = got["watch"]
    print("watch:", json.dumps({k: v for k, v in watch.items() if k != "endpoints"}),
          {ep: (s["ingress_progs"], s["egress_progs"], s["policy_maps"])
           for ep, s in watch.get("endpoints", {}).items()})
    # a new object was built and is what now runs on every endpoint
    assert set(got["objects_after"]) - set(got["objects_before"]), got["objects_after"]
    assert got["ping_covered_the_swap"] and got["iperf3_ran_throughout"]
    # the kernel's tc notifications: every hook's filter replaced in place, none deleted
    events = watch["tc_events"]
    assert events["deletions"] == [] and events["errors"] == [], events
    assert events["new_filters"] >= 2 * len(watch["endpoints"]), events
    assert watch["samples"] > 50, watch
    for ep, seen in watch["endpoints"].items():
        assert seen["missing_prog"] == 0 and seen["missing_policy"] == 0, (ep, seen)
        # the old program, then the new one, on both hooks: replaced, not re-added
        assert len(seen["ingress_progs"]) == 2 and len(seen["egress_progs"]) == 2, (ep, seen)
        sizes = set(seen["policy_maps"].values())
        assert len(sizes) == 1 and sizes.pop() >= 1, (ep, seen)  # never empty, never partial
    assert watch["pinned_before"] == watch["pinned_after"], watch  # maps reused
    # traffic: nothing lost beyond the bound, nothing broken, nothing leaked
    ping, bound = got["upgrade_ping"], got["baseline_ping"]["lost"]
    assert ping["lost"] <= bound, (ping, got["baseline_ping"])
    iperf = got["iperf3"]
    assert iperf["rc"] == 0 and not iperf["error"] and iperf["stalled_intervals"] == 0, iperf
    assert iperf["short_runs"] == 0, iperf
    assert got["wrk"]["requests"] > 0 and got["wrk"]["failed_runs"] == [], got["wrk"]
    for name in ("service", "l7"):
        assert got[name]["errors"] == [] and got[name]["ok"] > 10, (name, got[name])
    assert got["l7"]["leaks"] == 0 and got["deny"]["leaks"] == 0, (got["l7"], got["deny"])
    assert got["policy_drops"] >= got["deny"]["attempts"] > 20, got
    assert got["ct_entries_watched"] >= 4 and got["state_problems"] == [], got["state_problems"]
