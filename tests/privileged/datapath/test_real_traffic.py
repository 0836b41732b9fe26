"""Real packets between two pod namespaces through a node namespace running the programs:
ping and TCP allowed, then denied by a policy update; and the datapath outliving its
agent (kill -9): the stream survives, policy stays enforced, the next agent adopts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pylium.datapath import Datapath
from pylium.policy.mapstate import PROTO_TCP, Direction, EndpointPolicy, PolicyEntry, PolicyKey

from .netns_helpers import in_ns

ING, EGR = Direction.INGRESS, Direction.EGRESS
PODS = {"a": ("10.211.0.10", 1100), "b": ("10.211.0.11", 1101)}


def allow_all(revision=1) -> EndpointPolicy:
    return EndpointPolicy(True, True, {PolicyKey(0, ING): PolicyEntry(),
                                       PolicyKey(0, EGR): PolicyEntry()}, revision)


def ping(n, src: str, dst_ip: str) -> bool:
    return in_ns(n.pods[src]["ns"], "ping", "-c1", "-W1", dst_ip, check=False).returncode == 0


def tcp_ok(n, src: str, dst: str, port: int) -> bool:
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{n.pods[dst]['ns']}", "nc", "-d",
                               "-l", "-p", str(port)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        client = subprocess.run(["nsenter", f"--net=/run/netns/{n.pods[src]['ns']}", "sh", "-c",
                                 f"echo hello | nc -N -w 2 {n.pods[dst]['ip']} {port}"],
                                capture_output=True, timeout=10)
        out, _ = server.communicate(timeout=5) if client.returncode == 0 else (b"", None)
        return client.returncode == 0 and b"hello" in out
    except subprocess.TimeoutExpired:
        return False
    finally:
        server.kill()
        server.wait()


def test_ping_and_tcp_allowed_then_denied_by_a_policy_update(node):
    n = node("traffic", PODS)
    n.dp.update_policy(1, allow_all())
    n.dp.update_policy(2, allow_all())
    b_ip = PODS["b"][0]
    assert ping(n, "a", b_ip)
    assert tcp_ok(n, "a", "b", 8080)
    # b now accepts only TCP 8080 from a: ping is denied, TCP still works both ways
    n.dp.update_policy(2, EndpointPolicy(True, True, {
        PolicyKey(1100, ING, PROTO_TCP, 8080, 16): PolicyEntry(),
        PolicyKey(0, EGR): PolicyEntry()}, 2))
    assert not ping(n, "a", b_ip)
    assert tcp_ok(n, "a", "b", 8080)
    assert not tcp_ok(n, "a", "b", 8081)
    drops = {(m["reason"], m["direction"]): m["packets"] for m in n.dp.dump_metrics()}
    assert drops.get((133, "ingress"), 0) >= 2


AGENT = r"""
import json, sys, time
from pathlib import Path
from pylium.datapath import Datapath, EndpointInfo
from pylium.policy.mapstate import *
cfg = json.loads(sys.argv[1])
dp = Datapath(Path(cfg["root"]), cache_dir=Path(cfg["cache"])).open()
for ep in cfg["eps"]:
    dp.attach_endpoint(EndpointInfo(**ep))
only_5201 = lambda d, ident: EndpointPolicy(True, True, {
    PolicyKey(ident, d, PROTO_TCP, 5201, 16): PolicyEntry()}, 1)
dp.update_policy(1, only_5201(Direction.EGRESS, 1101))
dp.update_policy(2, only_5201(Direction.INGRESS, 1100))
print("READY", flush=True)
time.sleep(3600)
"""


def test_kill_9_of_the_agent_keeps_stream_policy_and_state(node):
    from .conftest import BPF_CACHE

    n = node("kill9", PODS)
    n.dp.close()  # the "agent" below owns the datapath now
    cfg = {"root": str(n.root), "cache": str(BPF_CACHE),
           "eps": [{"ep_id": e.ep_id, "ipv4": e.ipv4, "ifindex": e.ifindex, "ep_mac": e.ep_mac,
                    "host_mac": e.host_mac, "identity": e.identity} for e in n.eps.values()]}
    agent = subprocess.Popen(["nsenter", f"--net=/run/netns/{n.topo.node}", sys.executable, "-c",
                              AGENT, json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    server = client = None
    try:
        assert agent.stdout.readline().strip() == "READY"
        server = subprocess.Popen(["nsenter", f"--net=/run/netns/{n.pods['b']['ns']}", "iperf3",
                                   "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        client = subprocess.Popen(["nsenter", f"--net=/run/netns/{n.pods['a']['ns']}", "iperf3",
                                   "-c", PODS["b"][0], "-t", "4", "-J"], stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(1.5)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0, out[-500:]
        result = json.loads(out)
        assert result["end"]["sum_received"]["seconds"] >= 3.5
        assert result["end"]["sum_received"]["bytes"] > 0
        assert not ping(n, "a", PODS["b"][0]), "policy no longer enforced after kill -9"
        # a new agent adopts: same endpoints, policy revision and the stream's conntrack
        n.raw = Datapath(n.root, cache_dir=BPF_CACHE)
        n.dp._dp = n.raw
        n.dp.open()
        assert {e["ep_id"] for e in n.dp.dump_endpoints()} == {1, 2}
        assert n.dp.dump_policy(2)["revision"] == 1
        assert any(c["dport"] == 5201 and c["seen_reply"] for c in n.dp.dump_ct())
        assert not ping(n, "a", PODS["b"][0])
    finally:
        for proc in (agent, server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_endpoint_lookups_follow_attach_detach_and_writes_behind_the_index(node):
    """The endpoint index (no walk of the map per attach/detach) gives what a walk would:
    after a re-attach at a new address, after a detach, and after the map entry was
    overwritten behind its back (it notices and rebuilds)."""
    from pylium.datapath import EndpointInfo
    from pylium.datapath.maps.endpoints import EndpointKey

    n = node("epindex", PODS)
    dp = n.dp
    found = dp._find_endpoint(1)
    assert found is not None and found[0].ip == PODS["a"][0]
    assert dp._find_endpoint(99) is None
    # endpoint 1 re-attached at another address: the old key goes, the index follows
    a = n.eps["a"]
    moved = EndpointInfo(a.ep_id, "10.211.0.99", a.ifindex, a.ep_mac, a.host_mac, a.identity)
    dp.attach_endpoint(moved)
    assert dp._find_endpoint(1)[0].ip == "10.211.0.99"
    assert sorted(e["ipv4"] for e in dp.dump_endpoints()) == ["10.211.0.11", "10.211.0.99"]
    # endpoint 2's entry rewritten by someone else to name endpoint 7: found by its new id
    key = EndpointKey.of(PODS["b"][0])
    value = n.worker.run(n.raw.endpoints.lookup, key)
    value.ep_id = 7
    n.worker.run(n.raw.endpoints.update, key, value)
    assert dp._find_endpoint(2) is None
    assert dp._find_endpoint(7)[0].ip == PODS["b"][0]
    assert dp.detach_endpoint(1) and dp._find_endpoint(1) is None
    assert [e["ipv4"] for e in dp.dump_endpoints()] == [PODS["b"][0]]


def _peer_slot(n) -> list[int]:
    """The program ids in the pinned lxc_progs (bpftool prints them as hex bytes)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(n.root / "lxc_progs")],
                         capture_output=True, text=True, check=True).stdout
    return [int.from_bytes(bytes(int(b, 16) for b in row["value"]), "little")
            for row in json.loads(out)]


def test_local_delivery_runs_the_destination_side_in_from_container_or_falls_back(node):
    """Pod to pod on one node: from_container tail-calls to_container_peer (filled at load,
    pinned) and redirects into the pod's side of the veth; the destination's ingress policy
    still applies there. With the slot emptied (as while no agent has loaded the programs),
    the veth's own to_container does the same work: traffic and policy unchanged."""
    from pylium.datapath import libbpf

    n = node("peer", PODS)
    n.dp.update_policy(1, allow_all())
    b_ip = PODS["b"][0]
    assert _peer_slot(n) == [
        libbpf.prog_info(n.raw.prog_fds["to_container_peer"]).id]
    revision = 1
    for filled in (True, False):
        if not filled:
            subprocess.run(["bpftool", "map", "delete", "pinned", str(n.root / "lxc_progs"),
                            "key", "0", "0", "0", "0"], check=True)
            assert _peer_slot(n) == []
        revision += 1
        n.dp.update_policy(2, allow_all(revision))
        assert ping(n, "a", b_ip) and tcp_ok(n, "a", "b", 8080), filled
        # b accepts only TCP 8080 from a: ping denied, wherever b's side runs
        revision += 1
        n.dp.update_policy(2, EndpointPolicy(True, True, {
            PolicyKey(1100, ING, PROTO_TCP, 8080, 16): PolicyEntry(),
            PolicyKey(0, EGR): PolicyEntry()}, revision))
        assert not ping(n, "a", b_ip), filled
        assert tcp_ok(n, "a", "b", 8080), filled
    # the next load (an agent restart) fills the slot again
    n.dp.close()
    n.dp.open()
    assert _peer_slot(n) == [
        libbpf.prog_info(n.raw.prog_fds["to_container_peer"]).id]
