"""BPF_PROG_TEST_RUN scenarios on the real, attached programs (Cilium bpf/tests style):
each test names the behaviour a user relies on."""

from __future__ import annotations

import threading
import time

import pytest
from pylium.datapath.libbpf import DatapathError
from pylium.datapath.maps.base import BpfMap
from pylium.datapath.maps.events import decode as decode_event
from pylium.datapath.packet import build
from pylium.datapath.ringbuf import RingBufferReader
from pylium.datapath.testrun import decode_result
from pylium.errors import UserError
from pylium.policy.mapstate import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    port_range_blocks,
)

ING, EGR = Direction.INGRESS, Direction.EGRESS
A_ID, B_ID, C_ID = 1000, 1001, 1002
PODS = {"a": ("10.210.0.10", A_ID), "b": ("10.210.0.11", B_ID), "c": ("10.210.0.12", C_ID)}


def pol(entries, ingress=True, egress=True, revision=1) -> EndpointPolicy:
    return EndpointPolicy(ingress, egress, dict(entries), revision)


def allow_all(revision=1) -> EndpointPolicy:
    return pol({PolicyKey(0, ING): PolicyEntry(), PolicyKey(0, EGR): PolicyEntry()},
               revision=revision)


def real_run(n, pod: str, direction: Direction, src: str, dst: str, proto: int, sport: int,
             dport: int, tcp_flags: int = 0x02, mark: int = 0) -> dict:
    """Not a dry run: conntrack, events and metrics are written as for real traffic."""
    ep = n.eps[pod]
    pkt = build(src, dst, proto, sport, dport, tcp_flags=tcp_flags)
    prog = "from_container" if direction == EGR else "to_container"
    retval, ctx, _ = n.worker.run(n.raw.run_program, prog, pkt, ep.ifindex, mark=mark)
    return decode_result(retval, ctx, prog, direction)


def test_allow_and_default_deny(node):
    n = node("allow", PODS)
    n.dp.update_policy(2, pol({PolicyKey(A_ID, ING, PROTO_TCP, 80, 16): PolicyEntry()}))
    a, b = PODS["a"][0], PODS["b"][0]
    ok = n.dp.trace(2, "ingress", a, b, 40000, 80, PROTO_TCP)
    assert (ok["action"], ok["verdict"], ok["peer_identity"]) == ("forwarded", "allowed", A_ID)
    other_port = n.dp.trace(2, "ingress", a, b, 40000, 81, PROTO_TCP)
    assert (other_port["action"], other_port["drop_reason"]) == ("dropped", 133)
    other_peer = n.dp.trace(2, "ingress", PODS["c"][0], b, 40000, 80, PROTO_TCP)
    assert other_peer["action"] == "dropped" and other_peer["peer_identity"] == C_ID


def test_deny_beats_allow(node):
    n = node("denywins", PODS)
    n.dp.update_policy(2, pol({
        PolicyKey(A_ID, ING, PROTO_TCP, 80, 16): PolicyEntry(),   # specific L4 allow
        PolicyKey(0, ING): PolicyEntry(deny=True),                # wildcard L3 deny
    }))
    r = n.dp.trace(2, "ingress", PODS["a"][0], PODS["b"][0], 40000, 80, PROTO_TCP)
    assert (r["action"], r["verdict"], r["drop_reason"]) == ("dropped", "denied", 181)


def test_port_range_blocks(node):
    n = node("ports", PODS)
    entries = {PolicyKey(0, EGR, PROTO_TCP, port, plen): PolicyEntry()
               for port, plen in port_range_blocks(8000, 8100)}
    n.dp.update_policy(1, pol(entries))
    a, b = PODS["a"][0], PODS["b"][0]
    verdicts = {p: n.dp.trace(1, "egress", a, b, 40000, p, PROTO_TCP)["action"]
                for p in (7999, 8000, 8050, 8100, 8101)}
    assert verdicts == {7999: "dropped", 8000: "redirected", 8050: "redirected",
                        8100: "redirected", 8101: "dropped"}
    assert n.dp.trace(1, "egress", a, b, 40000, 8050, PROTO_UDP)["action"] == "dropped"


def test_cidr_with_except_through_ipcache_identities(node):
    n = node("cidr", PODS)
    cidr_id, except_id = 16777217, 16777218
    n.dp.upsert_ipcache("192.168.0.0/16", cidr_id)
    n.dp.upsert_ipcache("192.168.5.0/24", except_id)  # the `except` block: its own identity
    n.dp.update_policy(1, pol({PolicyKey(cidr_id, EGR): PolicyEntry()}))
    a = PODS["a"][0]
    inside = n.dp.trace(1, "egress", a, "192.168.1.1", 40000, 443, PROTO_TCP)
    excepted = n.dp.trace(1, "egress", a, "192.168.5.9", 40000, 443, PROTO_TCP)
    assert (inside["action"], inside["peer_identity"]) == ("forwarded", cidr_id)
    assert (excepted["action"], excepted["peer_identity"]) == ("dropped", except_id)
    assert {"cidr": "192.168.5.0/24", "identity": except_id, "tunnel_endpoint": None} in n.dp.dump_ipcache()
    n.dp.delete_ipcache("192.168.5.0/24")
    assert n.dp.trace(1, "egress", a, "192.168.5.9", 40000, 443, PROTO_TCP)["action"] == "forwarded"


def test_world_entity(node):
    n = node("world", PODS)
    n.dp.update_policy(1, pol({PolicyKey(2, EGR, PROTO_UDP, 53, 16): PolicyEntry()}))
    r = n.dp.trace(1, "egress", PODS["a"][0], "8.8.8.8", 40000, 53, PROTO_UDP)
    assert (r["action"], r["peer_identity"]) == ("forwarded", 2)
    assert n.dp.trace(1, "egress", PODS["a"][0], PODS["b"][0], 40000, 53, PROTO_UDP)["action"] == "dropped"
    ingress = n.dp.trace(1, "ingress", "8.8.8.8", PODS["a"][0], 53, 40000, PROTO_UDP)
    assert (ingress["action"], ingress["peer_identity"]) == ("dropped", 2)


def test_unenforced_direction_allows_everything(node):
    n = node("unenf", PODS)
    n.dp.update_policy(1, pol({PolicyKey(0, EGR): PolicyEntry(deny=True)}, egress=False))
    assert n.dp.trace(1, "egress", PODS["a"][0], PODS["b"][0], 1, 2, PROTO_TCP)["action"] == "redirected"


def test_endpoint_without_policy_drops_fail_closed(node):
    n = node("nopol", PODS)
    r = n.dp.trace(1, "egress", PODS["a"][0], PODS["b"][0], 1, 2, PROTO_TCP)
    assert (r["action"], r["drop_reason"]) == ("dropped", 165)


def test_spoofed_source_is_dropped(node):
    n = node("spoof", PODS)
    n.dp.update_policy(1, allow_all())
    r = real_run(n, "a", EGR, PODS["b"][0], PODS["c"][0], PROTO_TCP, 1, 80)
    assert (r["action"], r["drop_reason"]) == ("dropped", 132)


def test_replies_pass_through_conntrack(node):
    n = node("reply", PODS)
    a, b = PODS["a"][0], PODS["b"][0]
    # a may open connections to b:80; b may not open anything
    n.dp.update_policy(1, pol({PolicyKey(B_ID, EGR, PROTO_TCP, 80, 16): PolicyEntry()}, ingress=True))
    n.dp.update_policy(2, pol({PolicyKey(A_ID, ING, PROTO_TCP, 80, 16): PolicyEntry()}))
    assert real_run(n, "a", EGR, a, b, PROTO_TCP, 40001, 80)["ct"] == "new"
    assert real_run(n, "b", ING, a, b, PROTO_TCP, 40001, 80, mark=0)["action"] == "forwarded"
    # the reply leaves b (egress enforced, nothing allowed) and enters a (ingress: nothing)
    out = real_run(n, "b", EGR, b, a, PROTO_TCP, 80, 40001, tcp_flags=0x12)
    back = real_run(n, "a", ING, b, a, PROTO_TCP, 80, 40001, tcp_flags=0x12)
    assert (out["action"], out["ct"]) == ("redirected", "reply")
    assert (back["action"], back["ct"]) == ("forwarded", "reply")
    # the same packet that is not a reply is dropped
    assert real_run(n, "b", EGR, b, a, PROTO_TCP, 81, 40001)["action"] == "dropped"
    # established: the next packet of the flow skips the lookup
    assert real_run(n, "a", EGR, a, b, PROTO_TCP, 40001, 80, tcp_flags=0x10)["ct"] == "established"
    flows = [c for c in n.dp.dump_ct() if c["dport"] == 80 and c["sport"] == 40001]
    assert {c["direction"] for c in flows} == {"egress", "ingress"}
    assert all(c["seen_reply"] for c in flows)
    # ICMP echo: the reply mirrors the request's identifier
    n.dp.update_policy(1, pol({PolicyKey(B_ID, EGR, PROTO_ICMP, 8, 16): PolicyEntry()}, revision=2))
    assert real_run(n, "a", EGR, a, b, PROTO_ICMP, 77, 8)["action"] == "redirected"
    assert real_run(n, "a", ING, b, a, PROTO_ICMP, 77, 0)["ct"] == "reply"


def test_policy_change_applies_to_established_flows(node):
    n = node("revision", PODS)
    a, b = PODS["a"][0], PODS["b"][0]
    n.dp.update_policy(1, allow_all(revision=1))
    assert real_run(n, "a", EGR, a, b, PROTO_TCP, 40002, 80)["ct"] == "new"
    assert real_run(n, "a", EGR, a, b, PROTO_TCP, 40002, 80, 0x10)["ct"] == "established"
    n.dp.update_policy(1, pol({PolicyKey(0, ING): PolicyEntry()}, revision=2))
    r = real_run(n, "a", EGR, a, b, PROTO_TCP, 40002, 80, 0x10)
    assert (r["action"], r["ct"], r["drop_reason"]) == ("dropped", "established", 133)
    assert not [c for c in n.dp.dump_ct() if c["sport"] == 40002 and c["direction"] == "egress"]
    # the same revision number again still counts as a change (the datapath bumps it)
    assert n.dp.update_policy(1, allow_all(revision=2)) == 3


def test_conntrack_entries_expire(node):
    n = node("ctexp", PODS, ct_timeouts=(2, 2, 2, 2))
    a, b = PODS["a"][0], PODS["b"][0]
    n.dp.update_policy(1, pol({PolicyKey(B_ID, EGR, PROTO_UDP, 53, 16): PolicyEntry()}))
    assert real_run(n, "a", EGR, a, b, PROTO_UDP, 5353, 53)["ct"] == "new"
    assert real_run(n, "a", ING, b, a, PROTO_UDP, 53, 5353)["ct"] == "reply"
    time.sleep(2.5)
    late = real_run(n, "a", ING, b, a, PROTO_UDP, 53, 5353)
    assert (late["action"], late["ct"]) == ("dropped", "new")
    assert n.dp.ct_gc() >= 1
    assert not [c for c in n.dp.dump_ct() if c["sport"] == 5353]


def test_a_closing_tcp_connection_gets_the_fin_lifetime_and_gc_reads_in_batches(node,
                                                                                monkeypatch):
    """SYN → the SYN lifetime, the reply → the established one, FIN → Cilium's short closing
    one (so closed connections leave the table); the batched GC removes just the expired."""
    n = node("ctfin", PODS, ct_timeouts=(3600, 60, 30, 2))
    a, b = PODS["a"][0], PODS["b"][0]
    n.dp.update_policy(1, allow_all(revision=1))

    def expires_in(sport: int) -> float:
        [entry] = [c for c in n.dp.dump_ct() if c["sport"] == sport and c["direction"] == "egress"]
        return entry["expires_in_s"]

    real_run(n, "a", EGR, a, b, PROTO_TCP, 41000, 80)  # SYN
    assert 25 < expires_in(41000) <= 30
    real_run(n, "a", ING, b, a, PROTO_TCP, 80, 41000, 0x12)  # SYN-ACK: seen the reply
    assert 3500 < expires_in(41000) <= 3600
    # many long-lived flows beside it, so the GC has a table to read through
    for port in range(42000, 42300):
        real_run(n, "a", EGR, a, b, PROTO_TCP, port, 80)
    real_run(n, "a", EGR, a, b, PROTO_TCP, 41000, 80, 0x11)  # FIN-ACK
    assert 0 < expires_in(41000) <= 2
    before = len(n.dp.dump_ct())
    time.sleep(2.5)
    from pylium.datapath.maps.base import BpfMap

    def no_walk(self):
        raise AssertionError("the conntrack GC walked the map key by key")
    monkeypatch.setattr(BpfMap, "items", no_walk)  # this kernel has the batch lookup
    assert n.dp.ct_gc() == 1  # only the closed connection's entry had expired
    monkeypatch.undo()
    assert n.raw.ct_entries == before - 1 and n.raw.ct_capacity == 65536
    assert not [c for c in n.dp.dump_ct() if c["sport"] == 41000]
    assert len(n.dp.dump_ct()) == before - 1


def test_policy_swap_is_atomic_under_concurrent_test_runs(node):
    n = node("atomic", PODS)
    a, b = PODS["a"][0], PODS["b"][0]
    big = {PolicyKey(i + 5000, ING, PROTO_TCP, 1000 + i % 5000, 16): PolicyEntry()
           for i in range(3000)}
    v1 = {**big, PolicyKey(A_ID, ING, PROTO_TCP, 80, 16): PolicyEntry()}
    v2 = {PolicyKey(A_ID, ING): PolicyEntry()}
    n.dp.update_policy(2, pol(v1))
    seen: dict[str, int] = {}
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r = n.raw.trace(2, "ingress", a, b, 40000, 80, PROTO_TCP)
            seen[r["action"]] = seen.get(r["action"], 0) + 1

    t = threading.Thread(target=lambda: n.worker._pool.submit(hammer).result())
    t.start()
    # swaps run on this thread: the map fds work from any netns
    try:
        for i in range(20):
            n.raw.update_policy(2, pol(v2 if i % 2 else v1, revision=10 + i))
    finally:
        stop.set()
        t.join()
    assert set(seen) == {"forwarded"}, seen
    assert sum(seen.values()) > 20


def test_failed_update_keeps_the_old_policy_and_is_loud(node, monkeypatch):
    n = node("failsafe", PODS)
    n.dp.update_policy(2, pol({PolicyKey(A_ID, ING): PolicyEntry()}, revision=5))
    with pytest.raises(UserError, match="proxy_port 70000"):
        n.dp.update_policy(2, pol({PolicyKey(A_ID, ING, PROTO_TCP, 80, 16):
                                   PolicyEntry(proxy_port=70000)}, revision=6))
    # a kernel-side failure half-way through filling the new map (e.g. ENOMEM)
    real_update, calls = BpfMap.update, []

    def failing_update(self, key, value, flags=0):
        calls.append(self.name)
        if self.name.startswith("policy of endpoint") and len(calls) > 3:
            raise DatapathError("update of map policy: Cannot allocate memory (errno 12)")
        return real_update(self, key, value, flags)

    monkeypatch.setattr(BpfMap, "update", failing_update)
    many = {PolicyKey(i, ING, PROTO_TCP, 443, 16): PolicyEntry() for i in range(3000, 3010)}
    with pytest.raises(DatapathError, match="NOT updated"):
        n.dp.update_policy(2, pol(many, revision=7))
    monkeypatch.undo()
    dump = n.dp.dump_policy(2)
    assert dump["revision"] == 5 and len(dump["entries"]) == 1
    assert n.dp.trace(2, "ingress", PODS["a"][0], PODS["b"][0], 1, 80, PROTO_TCP)["action"] == "forwarded"


def test_drops_and_verdicts_reach_the_ring_buffer_and_metrics(node):
    n = node("events", PODS)
    a, b = PODS["a"][0], PODS["b"][0]
    n.dp.update_policy(2, pol({PolicyKey(A_ID, ING, PROTO_TCP, 80, 16): PolicyEntry()}))
    ring_path, _lost = n.raw.event_maps()
    reader = RingBufferReader.open_pinned(ring_path)
    try:
        reader.drain()
        real_run(n, "b", ING, a, b, PROTO_TCP, 40003, 81)
        real_run(n, "b", ING, a, b, PROTO_TCP, 40004, 80)
        raw = reader.drain()
    finally:
        reader.close()
    events = [decode_event(raw[i:i + 64]) for i in range(0, len(raw), 64)]
    kinds = [(e["type"], e.get("reason"), e.get("verdict"), e.get("observation_point"), e["dport"])
             for e in events]
    assert kinds == [("policy-verdict", None, "deny", None, 81), ("drop", 133, None, None, 81),
                     ("policy-verdict", None, "allow", None, 80),
                     ("trace", None, None, "to-endpoint", 80)]
    drop = events[1]
    assert (drop["src_identity"], drop["dst_identity"], drop["ep_id"], drop["saddr"]) == (A_ID, B_ID, 2, a)
    metrics = {(m["reason"], m["direction"]): m["packets"] for m in n.dp.dump_metrics()}
    assert metrics[(133, "ingress")] == 1 and metrics[(0, "ingress")] == 1


def test_lost_events_are_counted_exactly(node):
    n = node("lost", PODS)
    n.dp.update_policy(2, pol({}))
    ring_path, _ = n.raw.event_maps()
    reader = RingBufferReader.open_pinned(ring_path)
    try:
        reader.drain()
        before = n.dp.events_lost()
        runs = 20000  # two events (verdict + drop) each: far more than 1 MiB of ring
        pkt = build(PODS["a"][0], PODS["b"][0], PROTO_TCP, 1, 81)
        n.worker.run(n.raw.run_program, "to_container", pkt, n.eps["b"].ifindex, repeat=runs)
        delivered = len(reader.drain()) // 64
        lost = n.dp.events_lost() - before
    finally:
        reader.close()
    assert lost > 0
    assert delivered + lost == 2 * runs


def test_trace_runs_the_attached_program_and_reattach_replaces_cleanly(node):
    from pylium.datapath import EndpointInfo, libbpf, tc

    n = node("attach", PODS)
    ep = n.eps["a"]
    attached = n.worker.run(tc.query, ep.ifindex, tc.INGRESS)
    loaded = libbpf.prog_info(n.raw.prog_fds["from_container"]).id
    assert attached == loaded
    assert n.worker.run(tc.query, ep.ifindex, tc.EGRESS) == libbpf.prog_info(n.raw.prog_fds["to_container"]).id
    # same endpoint id, new address: one entry, still attached
    moved = EndpointInfo(ep.ep_id, "10.210.0.99", ep.ifindex, ep.ep_mac, ep.host_mac, ep.identity)
    n.dp.attach_endpoint(moved)
    n.dp.attach_endpoint(moved)
    rows = [r for r in n.dp.dump_endpoints() if r["ep_id"] == ep.ep_id]
    assert [r["ipv4"] for r in rows] == ["10.210.0.99"]
    assert n.worker.run(tc.query, ep.ifindex, tc.INGRESS) == loaded
    assert n.dp.detach_endpoint(ep.ep_id)
    assert n.worker.run(tc.query, ep.ifindex, tc.INGRESS) is None
    assert n.worker.run(tc.query, ep.ifindex, tc.EGRESS) is None
    assert ep.ep_id not in {r["ep_id"] for r in n.dp.dump_endpoints()}


def test_dry_run_needs_both_mark_and_cb_magic(node):
    n = node("dryrun", PODS)
    a, b = PODS["a"][0], PODS["b"][0]
    n.dp.update_policy(1, allow_all())
    pkt = build(a, b, PROTO_TCP, 40100, 80)
    ifindex = n.eps["a"].ifindex
    n.worker.run(n.raw.run_program, "from_container", pkt, ifindex, dry_run=True)
    assert not [c for c in n.dp.dump_ct() if c["sport"] == 40100]
    # the mark alone (e.g. set by something else on the node) is not a dry run
    n.worker.run(n.raw.run_program, "from_container", pkt, ifindex, mark=0x0D00)
    assert [c for c in n.dp.dump_ct() if c["sport"] == 40100]


def test_opening_from_another_netns_never_touches_its_namesake_interfaces(node):
    from pylium.datapath import Datapath, EndpointInfo, tc

    from .netns_helpers import NetnsWorker, in_ns, sh, unique

    n = node("netnsguard", PODS)
    decoy = unique("decoy")
    sh("ip", "netns", "add", decoy)
    worker = NetnsWorker(decoy)
    other = Datapath(n.root, cache_dir=n.raw.cache_dir)
    try:
        # fresh namespaces number their interfaces from the same small integers
        for i in range(4):
            in_ns(decoy, "ip", "link", "add", f"d{i}", "type", "veth", "peer", "name", f"e{i}")
        ifindexes = {ep.ifindex for ep in n.eps.values()}
        worker.run(other.open)  # adopts the pinned maps but must not re-attach here
        for ifindex in ifindexes:
            assert worker.run(tc.query, ifindex, tc.INGRESS) is None
            assert worker.run(tc.query, ifindex, tc.EGRESS) is None
        ep = n.eps["a"]
        with pytest.raises(UserError, match="not the MAC of ifindex"):
            worker.run(other.attach_endpoint, EndpointInfo(9, "10.210.0.50", ep.ifindex,
                                                          ep.ep_mac, ep.host_mac, 5))
        # in the node netns the programs are still attached
        assert n.worker.run(tc.query, ep.ifindex, tc.INGRESS) is not None
    finally:
        worker.run(other.close)
        worker.close()
        sh("ip", "netns", "del", decoy, check=False)
