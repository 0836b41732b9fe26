"""Service translation in the endpoint programs on real traffic: pods in netns behind a
node netns running bpf_lxc, LB maps written through `LbMaps` (the agent's component does
the same; its tests go through the API). Every answer arrives on a socket connected to
the VIP, so it proves the reply was reverse-NATed."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from pylium.datapath.lb import LbMaps
from pylium.datapath.maps.lb import LB_ALG_MAGLEV, LB_ALG_RANDOM
from pylium.lb import maglev
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey

from .conftest import CLIENT, client, nsenter

PODS = {"a": ("10.212.0.10", 1200), "b": ("10.212.0.11", 1201), "c": ("10.212.0.12", 1202)}
VIP = "10.96.7.10"
TCP, UDP = 6, 17


def allow_all(revision=1) -> EndpointPolicy:
    return EndpointPolicy(True, True, {PolicyKey(0, Direction.INGRESS): PolicyEntry(),
                                       PolicyKey(0, Direction.EGRESS): PolicyEntry()}, revision)


def setup(node, servers):
    n = node("lbdp", PODS)
    for ep_id in (1, 2, 3):
        n.dp.update_policy(ep_id, allow_all())
    for name in ("a", "b", "c"):
        servers(n.pods[name]["ns"], name, 8080)
    maps = LbMaps(n.root)
    maps.upsert_backend(1, PODS["b"][0], 8080, TCP)
    maps.upsert_backend(2, PODS["c"][0], 8080, TCP)
    maps.upsert_backend(3, PODS["a"][0], 8080, TCP)
    return n, maps


def served_by(answers: list[str]) -> collections.Counter:
    return collections.Counter(a.split()[0] for a in answers)


def test_clusterip_tcp_spreads_over_backends_and_replies_come_from_the_vip(node, servers):
    n, maps = setup(node, servers)
    try:
        maps.upsert_service(5, VIP, 80, TCP, [1, 2], algorithm=LB_ALG_RANDOM, lut=None)
        answers = client(n.pods["a"]["ns"], "tcp", VIP, 80, 20)
        assert len(answers) == 20 and not [a for a in answers if a.startswith("ERR")], answers
        seen = served_by(answers)
        assert set(seen) == {"b", "c"}, seen
        # the backend saw the client's own address (no SNAT for pod-to-service)
        assert {a.split()[1] for a in answers} == {PODS["a"][0]}
        # the service-scope conntrack entries remember the chosen backend
        service_entries = [e for e in n.dp.dump_ct() if e["direction"] == "service"]
        assert service_entries and {e["dst"] for e in service_entries} == {VIP}
    finally:
        maps.close()


def test_udp_service_and_backend_removal(node, servers):
    n, maps = setup(node, servers)
    try:
        maps.upsert_backend(11, PODS["b"][0], 8080, UDP)
        maps.upsert_backend(12, PODS["c"][0], 8080, UDP)
        maps.upsert_service(6, VIP, 53, UDP, [11, 12], algorithm=LB_ALG_RANDOM, lut=None)
        answers = client(n.pods["a"]["ns"], "udp", VIP, 53, 12)
        assert set(served_by(answers)) == {"b", "c"}, answers
        maps.upsert_service(6, VIP, 53, UDP, [12], algorithm=LB_ALG_RANDOM, lut=None)
        maps.delete_backend(11)
        answers = client(n.pods["a"]["ns"], "udp", VIP, 53, 8)
        assert served_by(answers) == {"c": 8}, answers
    finally:
        maps.close()


def test_hairpin_pod_reaches_itself_through_its_service(node, servers):
    n, maps = setup(node, servers)
    try:
        maps.upsert_service(7, VIP, 81, TCP, [3], algorithm=LB_ALG_RANDOM, lut=None)
        answers = client(n.pods["a"]["ns"], "tcp", VIP, 81, 3)
        # served by a itself; it saw the hairpin source address, not its own
        assert answers == ["a 169.254.42.1"] * 3, answers
        # another pod through the same service: plain DNAT
        assert client(n.pods["b"]["ns"], "tcp", VIP, 81) == [f"a {PODS['b'][0]}"]
    finally:
        maps.close()


def test_service_without_backends_rejects_tcp_and_udp_with_reason_158(node, servers):
    n, maps = setup(node, servers)
    try:
        maps.upsert_service(8, VIP, 82, TCP, [], algorithm=LB_ALG_RANDOM, lut=None)
        maps.upsert_service(15, VIP, 82, UDP, [], algorithm=LB_ALG_RANDOM, lut=None)
        started = time.monotonic()
        # TCP: a RST comes back at once (no waiting for a timeout)
        assert client(n.pods["a"]["ns"], "tcp", VIP, 82, 3) == ["ERR ConnectionRefusedError"] * 3
        assert time.monotonic() - started < 1.5
        # UDP: an ICMP port unreachable comes back (ECONNREFUSED on the connected socket)
        started = time.monotonic()
        assert client(n.pods["a"]["ns"], "udp", VIP, 82, 2) == ["ERR ConnectionRefusedError"] * 2
        assert time.monotonic() - started < 1.5
        drops = {m["reason"]: m["packets"] for m in n.dp.dump_metrics()}
        assert drops.get(158, 0) >= 4, drops
    finally:
        maps.close()


def test_maglev_sends_flows_where_the_table_says(node, servers):
    n, maps = setup(node, servers)
    try:
        names = [f"{PODS[p][0]}:8080/TCP" for p in ("b", "c")]
        table = maglev.compute_table(names, 251, maglev.new_seed())
        ids = [1, 2]
        maps.upsert_service(9, VIP, 83, TCP, ids, algorithm=LB_ALG_MAGLEV,
                            lut=[ids[i] for i in table])
        assert maps.dump_maglev([9])[9] == [ids[i] for i in table]
        answers = client(n.pods["a"]["ns"], "tcp", VIP, 83, 20)
        assert set(served_by(answers)) == {"b", "c"}, answers
        # a table naming only c: every new flow goes to c
        maps.upsert_service(9, VIP, 83, TCP, ids, algorithm=LB_ALG_MAGLEV, lut=[2] * 251)
        assert served_by(client(n.pods["a"]["ns"], "tcp", VIP, 83, 6)) == {"c": 6}
    finally:
        maps.close()


def test_client_ip_affinity_keeps_a_client_on_one_backend_until_timeout(node, servers):
    n, maps = setup(node, servers)
    try:
        maps.upsert_service(10, VIP, 84, TCP, [1, 2], algorithm=LB_ALG_RANDOM, lut=None,
                            affinity_timeout=1)
        first = served_by(client(n.pods["a"]["ns"], "tcp", VIP, 84, 12))
        assert len(first) == 1, first  # every new connection: the same backend
        # after the timeout the client may land elsewhere: over a few rounds, both serve
        seen = set(first)
        for _ in range(12):
            time.sleep(1.1)
            seen |= set(served_by(client(n.pods["a"]["ns"], "tcp", VIP, 84, 1)))
            if len(seen) == 2:
                break
        assert seen == {"b", "c"}
        assert [r["affinity_timeout"] for r in maps.dump() if r["id"] == 10] == [1]
    finally:
        maps.close()


def test_a_reused_tuple_that_no_longer_goes_through_the_service_is_not_rewritten(node, servers):
    """The same source port first to the VIP (conntrack keeps the backend tuple marked as
    a service flow), then straight to that backend: the reply must keep the backend's
    address (a stale reverse NAT would turn it into the VIP and the client would drop it)."""
    n, maps = setup(node, servers)
    try:
        maps.upsert_service(11, VIP, 85, TCP, [1], algorithm=LB_ALG_RANDOM, lut=None)
        a_ns, a_ip = n.pods["a"]["ns"], PODS["a"][0]
        assert client(a_ns, "tcp", VIP, 85, sport=41000) == [f"b {a_ip}"]
        time.sleep(0.2)
        assert client(a_ns, "tcp", PODS["b"][0], 8080, sport=41000) == [f"b {a_ip}"]
        assert client(a_ns, "tcp", VIP, 85, sport=41000) == [f"b {a_ip}"]
    finally:
        maps.close()


def test_socket_lb_connects_straight_to_a_backend_and_getpeername_shows_the_vip(node, servers):
    """bpf_sock.c on a cgroup of our own: the client's connect() to the VIP is rewritten
    before any packet exists (no service-scope conntrack entry: the tc path saw no VIP),
    and the connected socket still reports the VIP as its peer (lb_client checks)."""
    from pylium.datapath.sock import SocketLB

    n, maps = setup(node, servers)
    cgroup = Path("/sys/fs/cgroup/unified") / f"pylium-lbtest-{os.getpid()}-{time.time_ns()}"
    cgroup.mkdir()
    sock = SocketLB(n.raw)
    try:
        maps.upsert_backend(21, PODS["b"][0], 8080, UDP)
        maps.upsert_backend(22, PODS["c"][0], 8080, UDP)
        maps.upsert_service(12, VIP, 86, TCP, [1, 2], algorithm=LB_ALG_RANDOM, lut=None)
        maps.upsert_service(13, VIP, 87, UDP, [21, 22], algorithm=LB_ALG_RANDOM, lut=None)
        maps.upsert_service(14, VIP, 88, TCP, [], algorithm=LB_ALG_RANDOM, lut=None)
        sock.attach(cgroup)

        def in_cgroup(proto, port, count=1):
            argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh",
                    *nsenter(n.pods["a"]["ns"], sys.executable, str(CLIENT), proto, VIP,
                             str(port), str(count))]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.split("\n")[:-1]

        tcp = in_cgroup("tcp", 86, 12)
        assert set(served_by(tcp)) == {"b", "c"}, tcp  # no "ERR peer ...": getpeername = VIP
        udp = in_cgroup("udp", 87, 8)
        assert set(served_by(udp)) <= {"b", "c"} and "ERR" not in served_by(udp), udp
        assert not [e for e in n.dp.dump_ct() if e["direction"] == "service"]
        # no backend: connect() is refused at once (no SYN into the void)
        assert in_cgroup("tcp", 88) == ["ERR PermissionError"]
    finally:
        sock.detach()
        sock.close()
        maps.close()
        cgroup.rmdir()
