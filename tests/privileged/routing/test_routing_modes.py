"""Routing modes in a real multi-node lab: for each of vxlan (BPF encapsulation, the default),
vxlan through the kernel's device, geneve (BPF) and native, three node namespaces joined by an underlay bridge, one agent per node (sharing one KV store),
two pods per node. One lab per mode serves every test of that mode."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pylium.agent.client import AgentClient
from pylium.lab.lab import Lab
from pylium.lab.processes import stop_process

PYLIUM = str(Path(sys.executable).with_name("pylium"))
MODES = ("vxlan", "vxlan-device", "geneve", "native")
#: test variant → (routing mode, agent settings)
VARIANTS = {"vxlan-device": ("vxlan", {"plugin_options": {"vxlan": {"encapsulation": "device"}}})}
PODS = {"p1": "node1", "p2": "node1", "p3": "node2", "p4": "node2", "p5": "node3",
        "p6": "node3"}
BLOB_BYTES = 10 * 1024 * 1024
TUNNEL = {"vxlan": ("8472", ["-T", "vxlan"]), "vxlan-device": ("8472", ["-T", "vxlan"]),
          "geneve": ("6081", [])}


def _wait_ipcache(lab: Lab, pods: list[str], timeout: float = 30.0) -> None:
    """Every node's ipcache knows every pod (remote ones behind their node's IP)."""
    expected = {f"{lab.pod(p)['ip']}/32": (lab.pod(p)["identity"], lab.node(lab.pod(p)["node"])["ip"])
                for p in pods}
    deadline = time.monotonic() + timeout
    for node in lab.status()["nodes"]:
        while True:
            rows = {r["cidr"]: (r["identity"], r["tunnel_endpoint"])
                    for r in AgentClient(node["socket"]).get("/v1/bpf/ipcache")}
            missing = {cidr: want for cidr, want in expected.items()
                       if rows.get(cidr, (None, None))[0] != want[0]
                       or (want[1] != node["ip"] and rows[cidr][1] != want[1])}
            if not missing:
                break
            assert time.monotonic() < deadline, f"{node['name']} ipcache lacks {missing}"
            time.sleep(0.2)


def _make_lab(mode: str, pods: dict[str, str], nodes: int) -> Lab:
    lab = Lab(f"r{mode[0]}{uuid.uuid4().hex[:4]}")
    try:
        routing, settings = VARIANTS.get(mode, (mode, None))
        lab.up(nodes=nodes, routing=routing, agent_settings=settings)
        for pod, node in pods.items():
            lab.add_pod(pod, {"app": pod, "suite": "routing"}, node=node)
        _wait_ipcache(lab, list(pods))
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture(scope="module", params=MODES)
def cluster(request):
    lab = _make_lab(request.param, PODS, nodes=3)
    try:
        yield request.param, lab
    finally:
        lab.down()


def _ping(lab: Lab, src: str, dst: str, count: int = 1) -> bool:
    proc = lab.exec(src, ["ping", "-c", str(count), "-W", "2", "-i", "0.2", lab.pod(dst)["ip"]],
                    timeout=30)
    return proc.returncode == 0


def _matrix(lab: Lab) -> dict[tuple[str, str], bool]:
    pairs = [(a, b) for a in PODS for b in PODS if a != b]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = dict(zip(pairs, pool.map(lambda ab: _ping(lab, *ab), pairs), strict=True))
    for pair, ok in list(results.items()):  # one retry against a lost first packet
        if not ok:
            results[pair] = _ping(lab, *pair, count=2)
    return results


def test_full_ping_matrix(cluster):
    mode, lab = cluster
    results = _matrix(lab)
    assert [pair for pair, ok in results.items() if not ok] == []
    routing = lab.client("node1").get("/v1/routing")
    assert routing["mode"] == VARIANTS.get(mode, (mode,))[0]
    assert sorted(n["name"] for n in routing["nodes"]) == ["node2", "node3"]
    device = lab.exec("node1", ["ip", "-o", "link", "show", "pylium_vxlan"])
    if mode.startswith("vxlan"):  # the device carries it, or BPF on the underlay does
        assert (device.returncode == 0) is (mode == "vxlan-device"), device


def test_pod_mtu_from_routing_mode_and_large_transfers_both_ways(cluster, tmp_path):
    mode, lab = cluster
    expected = 1500 - (0 if mode == "native" else 50)
    assert lab.client("node2").get("/v1/routing")["pod_mtu"] == expected
    link = lab.exec("p3", ["ip", "-o", "link", "show", "eth0"])  # not /sys: that is the host's
    assert f" mtu {expected} " in link.stdout, link.stdout
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * (BLOB_BYTES // 256))
    for server in ("p1", "p6"):
        lab.start_server(server, [sys.executable, "-m", "http.server", "8080",
                                  "--directory", str(tmp_path)], port=8080)
    for client, server in (("p6", "p1"), ("p1", "p6")):
        proc = lab.exec(client, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
                                 "--max-time", "30",
                                 f"http://{lab.pod(server)['ip']}:8080/blob"], timeout=60)
        assert proc.returncode == 0, (client, server, proc)
        assert int(proc.stdout) == BLOB_BYTES


def test_wire_format_carries_source_identity(cluster):
    mode, lab = cluster
    src, dst = lab.pod("p2"), lab.pod("p5")
    if mode == "native":
        port, extra, filt = None, [], ["icmp"]
    else:
        port, extra = TUNNEL[mode]
        filt = ["udp", "port", port]
    cap = subprocess.Popen(
        ["nsenter", "--net=/run/netns/" + lab.node("node1")["netns"], "--", "tcpdump", "-nn",
         "-v", "-l", "--immediate-mode", "-i", "eth0", "-c", "2", *extra, *filt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert _ping(lab, "p2", "p5", count=3)
        out, err = cap.communicate(timeout=15)
    finally:
        cap.kill()
    assert f"{src['ip']} > {dst['ip']}: ICMP echo request" in out, out + err
    if mode == "native":
        # plain routed IP on the underlay: the receiver finds the identity in its ipcache
        assert "vni" not in out.lower()
        return
    vnis = re.findall(r"vni (0x[0-9a-f]+|\d+)", out)
    assert vnis, out
    decoded = "Geneve" if mode == "geneve" else "VXLAN"
    assert decoded in out
    outbound = out.split(f"{src['ip']} > {dst['ip']}")[0]
    vni = int(re.findall(r"vni (0x[0-9a-f]+|\d+)", outbound)[-1], 0)
    assert vni == src["identity"]


def test_label_policy_denies_exactly_one_cross_node_pair(cluster, tmp_path):
    mode, lab = cluster
    policy = tmp_path / "deny.yaml"
    policy.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        "metadata:\n  name: routing-deny-p1-p3\n"
        "spec:\n  endpointSelector:\n    matchLabels:\n      app: p3\n"
        "  ingress:\n  - fromEndpoints:\n    - {}\n"
        "  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        app: p1\n")
    # applied on every node, as an orchestrator would (each agent loads policies itself)
    agents = [[PYLIUM, "-H", node["socket"]] for node in lab.status()["nodes"]]
    for pylium in agents:
        subprocess.run([*pylium, "policy", "import", str(policy)], check=True,
                       capture_output=True, timeout=60)
    try:
        deadline = time.monotonic() + 20
        while _ping(lab, "p1", "p3"):  # regeneration is asynchronous to the import
            assert time.monotonic() < deadline, "p1 -> p3 still allowed"
            time.sleep(0.3)
        # p2 lives on p1's node: the receiver judged the pod's identity, not its node
        assert _ping(lab, "p2", "p3", count=2)
        assert _ping(lab, "p1", "p4", count=2)
        assert _ping(lab, "p5", "p3", count=2)
        assert _ping(lab, "p3", "p1", count=2)  # p3's egress and p1's ingress allow it
        assert not _ping(lab, "p1", "p3", count=2)
        drops = [m for m in lab.client("node2").get("/v1/bpf/metrics")
                 if m["reason"] == 181 and m["direction"] == "ingress"]
        assert drops and drops[0]["packets"] >= 1
        # Where the receiver takes the sender's identity from: node2's ipcache now lies that
        # p1's address is p2. Overlays still deny (the VNI says p1); native routing, which
        # knows senders only by address, now lets p1 in.
        node2 = lab.client("node2")
        p1, p2 = lab.pod("p1"), lab.pod("p2")
        entry = {"cidr": f"{p1['ip']}/32", "tunnel_endpoint": lab.node("node1")["ip"]}
        node2.put("/v1/routing/ipcache", {**entry, "identity": p2["identity"]})
        try:
            assert _ping(lab, "p1", "p3", count=2) is (mode == "native")
        finally:
            node2.put("/v1/routing/ipcache", {**entry, "identity": p1["identity"]})
    finally:
        for pylium in agents:
            subprocess.run([*pylium, "policy", "delete", "routing-deny-p1-p3"],
                           capture_output=True, timeout=60)


def test_switching_mode_is_config_and_restart():
    lab = _make_lab("vxlan", {"a": "node1", "b": "node2"}, nodes=2)
    try:
        assert _ping(lab, "a", "b", count=2)
        state = lab.load()
        for node in state["nodes"]:
            stop_process(node["agent_pid"], node["state_dir"])
            config = Path(node["state_dir"]) / "config.yaml"
            config.write_text(config.read_text().replace("routing_mode: vxlan",
                                                         "routing_mode: geneve"))
        for node in lab.load()["nodes"]:
            lab.start_agent(node)
        assert lab.client("node1").get("/v1/routing")["mode"] == "geneve"
        deadline = time.monotonic() + 20
        while not _ping(lab, "a", "b"):
            assert time.monotonic() < deadline, "no a -> b after switching to geneve"
        out = _capture(lab, "node1", ["udp"], lambda: _ping(lab, "a", "b", count=3))
        assert "Geneve" in out and "8472" not in out, out
    finally:
        lab.down()


def _capture(lab: Lab, node: str, filt: list[str], action) -> str:
    cap = subprocess.Popen(
        ["nsenter", "--net=/run/netns/" + lab.node(node)["netns"], "--", "tcpdump", "-nn",
         "-l", "--immediate-mode", "-i", "eth0", "-c", "2", *filt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        action()
        out, _err = cap.communicate(timeout=15)
    finally:
        cap.kill()
    return out
