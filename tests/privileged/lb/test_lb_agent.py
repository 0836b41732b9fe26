"""Services through a real agent: `pylium service add/list/delete` over the API, the lb
component writing the maps, pods in lab netns reaching the VIP (TCP, UDP, hairpin),
backend removal, and two agents sharing one KV store that both apply a service added on
one of them and compute the same Maglev table."""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pylium.lab.lab import Lab

from ..endpoint.eplab import make_lab
from .conftest import CLIENT, SERVER

VIP = "10.96.9.10"
PYLIUM = str(Path(sys.executable).with_name("pylium"))


def cli(lab: Lab, *args: str, node: str | None = None, check: bool = True):
    proc = subprocess.run([PYLIUM, "-H", lab.node(node)["socket"], *args],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def answers(lab: Lab, pod: str, proto: str, ip: str, port: int, count: int = 1) -> list[str]:
    proc = lab.exec(pod, [sys.executable, str(CLIENT), proto, ip, str(port), str(count)],
                    timeout=20 + 3 * count)
    return proc.stdout.splitlines()


def served_by(lines: list[str]) -> collections.Counter:
    return collections.Counter(line.split()[0] for line in lines)


def serve(lab: Lab, pod: str, port: int = 8080) -> None:
    lab.start_server(pod, [sys.executable, str(SERVER), pod, str(port)], port=port)


@pytest.fixture(scope="module")
def lab():
    lab = make_lab()
    try:
        for name in ("client", "web1", "web2"):
            lab.add_pod(name, {"app": name})
        for name in ("client", "web1", "web2"):
            serve(lab, name)
        yield lab
    finally:
        lab.down()


def ip(lab: Lab, pod: str) -> str:
    return lab.pod(pod)["ip"]


def test_clusterip_through_the_cli_tcp_udp_and_listing(lab):
    w1, w2 = ip(lab, "web1"), ip(lab, "web2")
    cli(lab, "service", "add", "--name", "default/web", "--frontend", f"{VIP}:80",
        "--backend", f"{w1}:8080", "--backend", f"{w2}:8080")
    cli(lab, "service", "add", "--name", "default/dns", "--frontend", f"{VIP}:53/UDP",
        "--backend", f"{w1}:8080", "--backend", f"{w2}:8080")
    try:
        listed = json.loads(cli(lab, "service", "list", "-o", "json").stdout)
        web = next(s for s in listed if s["spec"]["flags"]["name"] == "web")
        assert web["spec"]["frontend-address"] == {"ip": VIP, "port": 80, "protocol": "TCP",
                                                   "scope": "external"}
        assert [b["ip"] for b in web["spec"]["backend-addresses"]] == [w1, w2]
        table = cli(lab, "service", "list").stdout
        assert "Frontend" in table and "Service Type" in table
        assert f"1 => {w1}:8080/TCP (active)" in table
        bpf = json.loads(cli(lab, "bpf", "lb", "list", "-o", "json").stdout)
        assert {r["frontend"] for r in bpf} >= {f"{VIP}:80/TCP", f"{VIP}:53/UDP"}

        tcp = answers(lab, "client", "tcp", VIP, 80, 16)
        assert set(served_by(tcp)) == {"web1", "web2"}, tcp
        assert {line.split()[1] for line in tcp} == {ip(lab, "client")}
        udp = answers(lab, "client", "udp", VIP, 53, 12)
        assert set(served_by(udp)) == {"web1", "web2"}, udp

        # web1 leaves the service: new flows all go to web2
        cli(lab, "service", "add", "--name", "default/web", "--frontend", f"{VIP}:80",
            "--backend", f"{w2}:8080")
        assert served_by(answers(lab, "client", "tcp", VIP, 80, 8)) == {"web2": 8}
    finally:
        cli(lab, "service", "delete", "default/web", check=False)
        cli(lab, "service", "delete", "default/dns", check=False)
    # deleted: the VIP no longer answers, and the maps no longer hold it
    assert answers(lab, "client", "tcp", VIP, 80) == ["ERR TimeoutError"]
    assert json.loads(cli(lab, "bpf", "lb", "list", "-o", "json").stdout) == []


def test_hairpin_and_bad_input(lab):
    c = ip(lab, "client")
    cli(lab, "service", "add", "--name", "default/self", "--frontend", f"{VIP}:81",
        "--backend", f"{c}:8080")
    try:
        assert answers(lab, "client", "tcp", VIP, 81, 3) == ["client 169.254.42.1"] * 3
        assert answers(lab, "web1", "tcp", VIP, 81) == [f"client {ip(lab, 'web1')}"]
        bad = cli(lab, "service", "add", "--name", "default/x", "--frontend", "10.96.9.300:80",
                  check=False)
        assert bad.returncode != 0 and "not an IPv4 address" in bad.stderr
        assert "Traceback" not in bad.stderr
        dup = cli(lab, "service", "add", "--name", "default/y", "--frontend", f"{VIP}:81",
                  check=False)
        assert dup.returncode != 0 and "already service default/self" in dup.stderr
        missing = cli(lab, "service", "delete", "default/nope", check=False)
        assert missing.returncode != 0 and "no service" in missing.stderr
    finally:
        cli(lab, "service", "delete", "default/self", check=False)


def test_observe_names_the_service_and_shows_the_translation(lab):
    """Real connections to a VIP: their flows carry the service (Hubble's
    destination_service), the VIP they addressed, and the backend they went to."""
    w1 = ip(lab, "web1")
    cli(lab, "service", "add", "--name", "default/seen", "--frontend", f"{VIP}:82",
        "--backend", f"{w1}:8080")
    try:
        assert served_by(answers(lab, "client", "tcp", VIP, 82, 3)) == {"web1": 3}
        flows: list[dict] = []
        deadline = time.monotonic() + 20
        while not flows and time.monotonic() < deadline:
            out = cli(lab, "observe", "-o", "json", "--from-pod", "default/client",
                      "--to-service", "default/seen", "--since", "5m").stdout
            flows = [json.loads(line)["flow"] for line in out.splitlines()]
            time.sleep(0.3)
        assert flows, "no flow of the client through the service was observed"
        assert all(f["service_frontend"] == f"{VIP}:82/TCP" for f in flows), flows
        f = flows[-1]
        assert f["destination_service"] == {"name": "seen", "namespace": "default"}
        assert f["service_frontend"] == f"{VIP}:82/TCP"
        assert f["IP"]["destination"] == w1  # translated: the datapath saw the backend
        assert f["l4"]["TCP"]["destination_port"] == 8080
        compact = cli(lab, "observe", "--from-pod", "default/client", "--since", "5m").stdout
        assert f"-> {VIP}:82 (service default/seen) => default/web1:8080" in compact, compact
        # each new connection's translation is a flow of its own, verdict TRANSLATED (3)
        out = cli(lab, "observe", "-o", "json", "--from-pod", "default/client",
                  "--to-service", "default/seen", "--verdict", "TRANSLATED",
                  "--since", "5m").stdout
        translated = [json.loads(line)["flow"] for line in out.splitlines()]
        assert len(translated) == 3, translated
        assert all(t["verdict"] == "TRANSLATED" and t["IP"]["destination"] == w1
                   and t["destination_service"]["name"] == "seen" for t in translated)
        assert "TRANSLATED" in cli(lab, "observe", "--from-pod", "default/client",
                                   "--verdict", "TRANSLATED", "--since", "5m").stdout
    finally:
        cli(lab, "service", "delete", "default/seen", check=False)


def test_backends_change_while_a_client_loops_without_errors(lab):
    """Backends added, removed, marked terminating while new connections keep coming: no
    connection fails (every backend server stays up, so any error would be the update's
    fault: a slot naming a missing backend, an empty window)."""
    w1, w2, c = ip(lab, "web1"), ip(lab, "web2"), ip(lab, "client")

    def put(*backends):
        body = {"frontend": f"{VIP}:93", "backends": list(backends)}
        lab.client().put("/v1/service/default/churn", body)

    put(f"{w1}:8080")
    loop = subprocess.Popen(lab.exec_argv("client", [sys.executable, str(CLIENT), "tcp", VIP,
                                                     "93", "1000000"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in loop.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def connections_go_on(count: int = 40) -> None:
        """Each backend set serves new connections before the next update (the loop's
        pace, not a sleep: a slow start under load once left web2's window empty)."""
        goal, deadline = len(lines) + count, time.monotonic() + 30
        while len(lines) < goal and loop.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(lines) >= goal, (len(lines), loop.poll(), lines[-5:])

    try:
        connections_go_on()
        for backends in ([f"{w1}:8080", f"{w2}:8080"], [f"{w2}:8080"],
                         [f"{w2}:8080", f"{c}:8080"],
                         [{"address": f"{w2}:8080", "state": "terminating"}, f"{c}:8080"],
                         [f"{w1}:8080"]):
            put(*backends)
            connections_go_on()
        loop.terminate()
        loop.wait(timeout=30)
        reader.join(timeout=30)
        done = [x.strip() for x in lines[:-1]]  # the last one may be cut short
        errs = [(i, done[max(0, i - 2):i + 3]) for i, x in enumerate(done) if x.startswith("ERR")]
        assert len(done) > 200 and not errs, errs
        assert set(served_by(done)) >= {"web1", "web2", "client"}
        # terminating backends take no new flows: after the last update only web1 serves
        assert served_by(answers(lab, "client", "tcp", VIP, 93, 6)) == {"web1": 6}
    finally:
        loop.kill()
        lab.client().delete("/v1/service/default/churn")


def test_a_removed_backend_finishes_its_established_flow_then_leaves_the_map(lab):
    """A backend taken out of a service while a connection to it is open: the connection
    goes on to its end (kube-proxy's conntrack keeps such flows too), new connections go
    to the backends left, and the removed backend leaves lb4_backends once no flow names
    it. (Before, its entry went at once and the flow's next packet picked another backend,
    which answered with a reset.)"""
    w1, w2 = ip(lab, "web1"), ip(lab, "web2")
    lab.start_server("web1", ["iperf3", "-s", "-p", "5202"], port=5202)
    cli(lab, "service", "add", "--name", "default/moving", "--frontend", f"{VIP}:5202",
        "--backend", f"{w1}:5202")
    try:
        stream = subprocess.Popen(
            lab.exec_argv("client", ["iperf3", "-c", VIP, "-p", "5202", "-t", "4", "-J"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        # web2 runs no iperf3: a flow re-picked to it would be reset
        lab.client().put("/v1/service/default/moving",
                         {"frontend": f"{VIP}:5202", "backends": [f"{w2}:8080"]})
        assert f"{w1}:5202" in lab.client().get("/v1/lb")["draining_backends"]
        out, err = stream.communicate(timeout=30)
        assert stream.returncode == 0, (out, err)
        result = json.loads(out)
        assert "error" not in result, result.get("error")
        assert result["end"]["sum_received"]["bytes"] > 0
        # the service itself serves from the backend left
        assert served_by(answers(lab, "client", "tcp", VIP, 5202, 3)) == {"web2": 3}
        deadline = time.monotonic() + 40  # the closed flow's conntrack entry expires (10 s)
        while f"{w1}:5202" in lab.client().get("/v1/lb")["draining_backends"]:
            assert time.monotonic() < deadline, (
                "the removed backend never left the map",
                [e for e in json.loads(cli(lab, "bpf", "ct", "list", "-o", "json").stdout)
                 if e["direction"] == "service" and e["dport"] == 5202][0:3]).__repr__()
            time.sleep(0.5)
        backends = {b["address"] for r in json.loads(cli(lab, "bpf", "lb", "list", "-o",
                                                          "json").stdout)
                    for b in r["backends"]}
        assert f"{w1}:5202" not in backends
    finally:
        cli(lab, "service", "delete", "default/moving", check=False)


def _backend_id_of(lab: Lab, address: str) -> int:
    ids = {b["backend_id"] for r in json.loads(cli(lab, "bpf", "lb", "list", "-o", "json").stdout)
           for b in r["backends"] if b["address"] == address}
    assert len(ids) == 1, (address, ids)
    return ids.pop()


def test_after_a_restart_no_new_backend_takes_an_id_a_client_affinity_names(lab):
    """A backend removed (drained, gone from lb4_backends) while a client's session
    affinity entry still names its id; the agent restarts; a new backend of another
    service must not get that id, or the client's next connection to the first service
    would go to the other service's backend. New ids start above every id a conntrack or
    affinity entry names."""
    w1, w2 = ip(lab, "web1"), ip(lab, "web2")
    serve(lab, "web2", 8091)
    serve(lab, "web2", 8092)
    # w1:8080 has its id before the backend that will leave, so that one is the highest
    cli(lab, "service", "add", "--name", "default/aff-keep", "--frontend", f"{VIP}:97",
        "--backend", f"{w1}:8080")
    cli(lab, "service", "add", "--name", "default/aff", "--frontend", f"{VIP}:95",
        "--backend", f"{w2}:8091", "--affinity", "600")
    try:
        assert served_by(answers(lab, "client", "tcp", VIP, 95)) == {"web2": 1}
        gone = _backend_id_of(lab, f"{w2}:8091")
        cli(lab, "service", "add", "--name", "default/aff", "--frontend", f"{VIP}:95",
            "--backend", f"{w1}:8080", "--affinity", "600")
        deadline = time.monotonic() + 40  # the closed flow's conntrack entry expires (10 s)
        while f"{w2}:8091" in lab.client().get("/v1/lb")["draining_backends"]:
            assert time.monotonic() < deadline, "the removed backend never left the map"
            time.sleep(0.5)
        os.kill(lab.node()["agent_pid"], signal.SIGKILL)
        lab.start_agent(lab.node())
        cli(lab, "service", "add", "--name", "default/aff-other", "--frontend", f"{VIP}:96",
            "--backend", f"{w2}:8092")
        assert _backend_id_of(lab, f"{w2}:8092") > gone
        # the affinity entry names a backend that is gone: the client is served by the
        # service's own backend, never by the other service's
        assert served_by(answers(lab, "client", "tcp", VIP, 95, 3)) == {"web1": 3}
    finally:
        for name in ("aff", "aff-keep", "aff-other"):
            cli(lab, "service", "delete", f"default/{name}", check=False)


def test_terminating_backend_takes_no_new_flows(lab):
    w1, w2 = ip(lab, "web1"), ip(lab, "web2")
    lab.client().put("/v1/service/default/drain", {
        "frontend": f"{VIP}:94",
        "backends": [f"{w1}:8080", {"address": f"{w2}:8080", "state": "terminating"}]})
    try:
        assert served_by(answers(lab, "client", "tcp", VIP, 94, 10)) == {"web1": 10}
        listed = json.loads(cli(lab, "service", "list", "-o", "json").stdout)
        states = {b["ip"]: b["state"] for s in listed if s["spec"]["id"]
                  for b in s["spec"]["backend-addresses"] if s["spec"]["flags"]["name"] == "drain"}
        assert states == {w1: "active", w2: "terminating"}
    finally:
        lab.client().delete("/v1/service/default/drain")


def test_nodeport_from_the_world_keeps_the_client_address(lab):
    w1, w2 = ip(lab, "web1"), ip(lab, "web2")
    node_ip = lab.node()["ip"]
    world_ip = lab.status()["world"]["ip"]
    for proto in ("TCP", "UDP"):
        cli(lab, "service", "add", "--name", f"default/np-{proto.lower()}", "--frontend",
            f"{VIP}:90/{proto}", "--backend", f"{w1}:8080", "--backend", f"{w2}:8080",
            "--type", "NodePort", "--node-port", "30080", "--traffic-policy", "Local")
    try:
        table = cli(lab, "service", "list").stdout
        assert "NodePort" in table and "(node):30080/TCP" in table
        got = answers(lab, "world", "tcp", node_ip, 30080, 16)
        assert set(served_by(got)) == {"web1", "web2"}, got
        assert {line.split()[1] for line in got} == {world_ip}  # client address kept
        got = answers(lab, "world", "udp", node_ip, 30080, 10)
        assert set(served_by(got)) == {"web1", "web2"}, got
        # the ClusterIP frontend of a NodePort service serves pods as before
        assert served_by(answers(lab, "client", "tcp", VIP, 90, 4)).keys() <= {"web1", "web2"}
    finally:
        cli(lab, "service", "delete", "default/np-tcp", check=False)
        cli(lab, "service", "delete", "default/np-udp", check=False)
    assert answers(lab, "world", "tcp", node_ip, 30080) != ["web1 " + world_ip]


def test_agent_kill_and_restart_keeps_the_service_and_its_open_connection(lab):
    w1 = ip(lab, "web1")
    lab.start_server("web1", ["iperf3", "-s", "-p", "5201"], port=5201)
    cli(lab, "service", "add", "--name", "default/perf", "--frontend", f"{VIP}:5201",
        "--backend", f"{w1}:5201")
    cli(lab, "service", "add", "--name", "default/side", "--frontend", f"{VIP}:82",
        "--backend", f"{ip(lab, 'web2')}:8080")
    try:
        before = json.loads(cli(lab, "bpf", "lb", "list", "-o", "json").stdout)
        stream = subprocess.Popen(
            lab.exec_argv("client", ["iperf3", "-c", VIP, "-p", "5201", "-t", "6", "-J"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        agent_pid = lab.node()["agent_pid"]
        os.kill(agent_pid, signal.SIGKILL)
        time.sleep(0.5)
        # no agent: the pinned maps keep translating new connections too
        assert answers(lab, "client", "tcp", VIP, 82) == [f"web2 {ip(lab, 'client')}"]
        lab.start_agent(lab.node())
        out, err = stream.communicate(timeout=30)
        assert stream.returncode == 0, err
        result = json.loads(out)
        assert "error" not in result, result.get("error")
        assert result["end"]["sum_received"]["bytes"] > 0
        assert result["start"]["connected"][0]["remote_host"] == VIP
        # the restarted agent adopted the maps: same frontends, same backend ids
        assert json.loads(cli(lab, "bpf", "lb", "list", "-o", "json").stdout) == before
    finally:
        cli(lab, "service", "delete", "default/perf", check=False)
        cli(lab, "service", "delete", "default/side", check=False)


@pytest.fixture(scope="module")
def lab2():
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    lab = Lab("l" + secrets.token_hex(3))
    try:
        lab.up(nodes=2, routing="vxlan")
        lab.add_pod("client", {"app": "client"}, node="node1")
        lab.add_pod("near", {"app": "web"}, node="node1")
        lab.add_pod("far", {"app": "web"}, node="node2")
        for name in ("near", "far"):
            serve(lab, name)
        yield lab
    finally:
        lab.down()


def _maglev_by_address(lab: Lab, node: str) -> list[str]:
    """The node's Maglev table for the one maglev service, as backend addresses."""
    rows = json.loads(cli(lab, "bpf", "lb", "list", "-o", "json", node=node).stdout)
    addresses = {b["backend_id"]: b["address"] for r in rows for b in r["backends"]}
    tables = json.loads(cli(lab, "bpf", "lb", "maglev", "list", "-o", "json", node=node).stdout)
    assert len(tables) == 1
    return [addresses[i] for i in tables[0]["table"]]


def _maglev_inner_ids(lab: Lab, node: str) -> list:
    """The inner map ids the node's pinned lb4_maglev holds (one per Maglev frontend)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                          f"{lab.node(node)['bpffs_root']}/lb4_maglev"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(json.dumps(row["value"]) for row in json.loads(out))


def test_service_added_on_one_node_works_on_the_other_with_the_same_maglev_table(lab2):
    near, far = ip(lab2, "near"), ip(lab2, "far")
    cli(lab2, "service", "add", "--name", "default/mag", "--frontend", f"{VIP}:80",
        "--backend", f"{near}:8080", "--backend", f"{far}:8080", "--algorithm", "maglev",
        node="node2")
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            listed = json.loads(cli(lab2, "service", "list", "-o", "json", node="node1").stdout)
            if listed:
                break
            time.sleep(0.2)
        assert listed and listed[0]["spec"]["algorithm"] == "maglev"
        t1, t2 = _maglev_by_address(lab2, "node1"), _maglev_by_address(lab2, "node2")
        assert t1 == t2 and len(t1) == 16381 and set(t1) == {f"{near}:8080", f"{far}:8080"}
        # from a pod on node1: both the local and the cross-node (vxlan) backend answer
        got = answers(lab2, "client", "tcp", VIP, 80, 20)
        assert set(served_by(got)) == {"near", "far"}, got
        assert {line.split()[1] for line in got} == {ip(lab2, "client")}
        # kill -9 and restart: the agent installs the stored table, finds it already
        # pinned and keeps that very map (adopted, not rebuilt)
        inner = _maglev_inner_ids(lab2, "node1")
        node1 = lab2.node("node1")
        os.kill(node1["agent_pid"], signal.SIGKILL)
        lab2.start_agent(node1)
        assert _maglev_by_address(lab2, "node1") == t1
        assert _maglev_inner_ids(lab2, "node1") == inner and len(inner) == 1
    finally:
        cli(lab2, "service", "delete", "default/mag", node="node1", check=False)


def test_nodeport_local_and_cluster_across_two_nodes(lab2):
    """Local: each node's NodePort reaches only its own backend and the backend sees the
    client (world) address. Cluster on a node without a backend: forwarded to the other
    node with the source NATed to the first node's address; replies come back through it."""
    near, far = ip(lab2, "near"), ip(lab2, "far")
    world_ip = lab2.status()["world"]["ip"]
    n1, n2 = lab2.node("node1")["ip"], lab2.node("node2")["ip"]
    cli(lab2, "service", "add", "--name", "default/np-local", "--frontend", f"{VIP}:91",
        "--backend", f"{near}:8080", "--backend", f"{far}:8080", "--type", "NodePort",
        "--node-port", "30091", "--traffic-policy", "Local", node="node1")
    cli(lab2, "service", "add", "--name", "default/np-cluster", "--frontend", f"{VIP}:92",
        "--backend", f"{far}:8080", "--type", "NodePort", "--node-port", "30092",
        node="node1")
    cli(lab2, "service", "add", "--name", "default/np-cluster-udp", "--frontend",
        f"{VIP}:92/UDP", "--backend", f"{far}:8080", "--type", "NodePort", "--node-port",
        "30092", node="node1")
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(json.loads(
                cli(lab2, "service", "list", "-o", "json", node="node2").stdout)) < 3:
            time.sleep(0.2)
        assert answers(lab2, "world", "tcp", n1, 30091, 6) == [f"near {world_ip}"] * 6
        assert answers(lab2, "world", "tcp", n2, 30091, 6) == [f"far {world_ip}"] * 6
        # Cluster, entering node1 whose only backend is on node2: SNAT to node1
        got = answers(lab2, "world", "tcp", n1, 30092, 6)
        assert got == [f"far {n1}"] * 6, got
        assert answers(lab2, "world", "udp", n1, 30092, 4) == [f"far {n1}"] * 4
        # entering node2 (backend local there): the client's address is kept
        assert answers(lab2, "world", "tcp", n2, 30092, 4) == [f"far {world_ip}"] * 4
    finally:
        cli(lab2, "service", "delete", "default/np-local", node="node1", check=False)
        cli(lab2, "service", "delete", "default/np-cluster", node="node1", check=False)
        cli(lab2, "service", "delete", "default/np-cluster-udp", node="node1", check=False)


@pytest.mark.parametrize("routing", ["native", "geneve"])
def test_clusterip_cross_node_in_other_routing_modes(routing):
    """The translated packet's destination is a pod IP: each routing mode carries it."""
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    lab = Lab("r" + secrets.token_hex(3))
    try:
        lab.up(nodes=2, routing=routing)
        lab.add_pod("client", {"app": "client"}, node="node1")
        lab.add_pod("far", {"app": "web"}, node="node2")
        serve(lab, "far")
        lab.client("node1").put("/v1/service/default/x", {
            "frontend": f"{VIP}:80", "backends": [f"{ip(lab, 'far')}:8080"]})
        got = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # node2 learns the client's pod from the KV store
            got = answers(lab, "client", "tcp", VIP, 80, 3)
            if got == [f"far {ip(lab, 'client')}"] * 3:
                break
            time.sleep(0.5)
        assert got == [f"far {ip(lab, 'client')}"] * 3, got
    finally:
        lab.down()
