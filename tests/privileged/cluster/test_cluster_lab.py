"""Three real agents, one per node namespace, sharing one real etcd (running in the lab's
own namespace on the underlay): cluster-wide identity allocation under concurrency, an
etcd outage while traffic flows, and a node killed without cleanup.

The outage lasts 30 s, as the issue asks: watches break, keepalives fail, every agent reports
degraded, enforcement is checked over and over while it lasts, then everything resyncs."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pylium.agent.client import AgentClient
from pylium.lab.lab import Lab

PYLIUM = str(Path(sys.executable).with_name("pylium"))
LEASE_TTL = 3
OUTAGE_S = 30


def until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def lab():
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=False)
    lab = Lab("c" + secrets.token_hex(3))
    try:
        lab.up(nodes=3, demo="starwars", kvstore="etcd", agent_settings={
            "plugin_options": {"cluster": {"lease_ttl": LEASE_TTL,
                                           "identity_gc_interval": 2}}})
        lab.add_pod("web2", {"app": "web"}, node="node2")
        lab.add_pod("db3", {"app": "db"}, node="node3")
        yield lab
    finally:
        lab.down()


def clients(lab, names=("node1", "node2", "node3")):
    return {n: AgentClient(lab.node(n)["socket"], timeout=30) for n in names}


def kv_list(lab, prefix):
    return AgentClient(lab.node("node1")["socket"]).get(
        f"/v1/kvstore/list?prefix={prefix}")["items"]


def ipcache_in_sync(client):
    report = client.get("/v1/cluster/ipcache")
    return not (report["missing"] or report["stale"] or report["different"]) and report


def check_identities_unique(lab):
    """Every label set has exactly one number and every number one label set, in the store
    and in every agent's view."""
    ids = {int(i["key"].rsplit("/", 1)[1]): tuple(i["value"])
           for i in kv_list(lab, "pylium/state/identities/v1/id/")}
    assert len(set(ids.values())) == len(ids), "a label set has two identities"
    values = kv_list(lab, "pylium/state/identities/v1/value/")
    for item in values:
        assert int(item["value"]) in ids, f"index {item['key']} names a missing identity"
    return ids


def test_nodes_register_and_remote_endpoints_reach_every_bpf_ipcache(lab):
    agents = clients(lab)
    for name, client in agents.items():
        nodes = until(lambda c=client: len(c.get("/v1/cluster/nodes")) == 3
                      and c.get("/v1/cluster/nodes"), what=f"{name} sees 3 nodes")
        assert {n["name"]: n["ipv4"] for n in nodes} == {
            "node1": "192.168.100.11", "node2": "192.168.100.12", "node3": "192.168.100.13"}
    out = subprocess.run([PYLIUM, "-H", lab.node("node2")["socket"], "node", "list", "-o",
                          "json"], capture_output=True, text=True, check=True).stdout
    assert sorted(n["pod_cidr"] for n in json.loads(out)) == [
        "10.200.1.0/24", "10.200.2.0/24", "10.200.3.0/24"]
    table = subprocess.run([PYLIUM, "-H", lab.node("node2")["socket"], "node", "list"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "IPV4", "ADDRESS"]
    assert [line.split()[0] for line in table[1:]] == ["node1", "node2", "node3"]
    assert table[2].split()[-1] == "local" and table[1].split()[-1] == "kvstore"
    web2, db3 = lab.pod("web2"), lab.pod("db3")
    for client in agents.values():
        until(lambda c=client: ipcache_in_sync(c), what="ipcache in sync")
    # the real BPF map of node1 holds node3's pod with node3 as tunnel endpoint
    rows = _bpf_ipcache(lab, "node1")
    assert rows[f"{db3['ip']}/32"]["tunnel_endpoint"] == "192.168.100.13"
    assert rows[f"{web2['ip']}/32"]["tunnel_endpoint"] == "192.168.100.12"
    db3_identity = lab.client("node3").get("/v1/endpoint")[0]["identity"]
    assert rows[f"{db3['ip']}/32"]["identity"] == db3_identity
    # cluster-wide identities, with the nodes that use them
    out = subprocess.run([PYLIUM, "-H", lab.node("node1")["socket"], "node", "identities",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    refs = {i["id"]: i["references"] for i in json.loads(out)}
    assert refs[db3_identity] == ["node3"]
    assert "k8s:app=db" in {lab_id["id"]: " ".join(lab_id["labels"]) for lab_id in
                            agents["node1"].get("/v1/identity")}[db3_identity]
    text = subprocess.run([PYLIUM, "-H", lab.node("node3")["socket"], "status"],
                          capture_output=True, text=True, check=True).stdout
    assert "KVStore:       etcd  Ok" in text and "(cluster state: ok)" in text


def _bpf_ipcache(lab, node):
    out = subprocess.run([PYLIUM, "-H", lab.node(node)["socket"], "bpf", "ipcache", "list",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return {r["cidr"]: r for r in json.loads(out)}


@pytest.mark.parametrize("count", [2, 3])
def test_200_concurrent_allocations_from_several_agents_give_one_identity_per_label_set(
        lab, count):
    agents = list(clients(lab).values())[:count]
    label_sets = [[f"app=svc{i % 40}", f"tier=t{i % 3}", f"agents={count}"]
                  for i in range(60)]
    rng = random.Random(count)
    jobs = [(agents[i % count], rng.choice(label_sets)) for i in range(200)]

    def allocate(job):
        client, labels = job
        return tuple(sorted(labels)), client.post("/v1/cluster/identities",
                                                  {"labels": labels})["id"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(allocate, jobs))
    by_labels: dict[tuple, set[int]] = {}
    for labels, number in results:
        by_labels.setdefault(labels, set()).add(number)
    assert all(len(numbers) == 1 for numbers in by_labels.values()), by_labels
    numbers = [next(iter(n)) for n in by_labels.values()]
    assert len(numbers) == len(set(numbers)), "one identity given to two label sets"
    ids = check_identities_unique(lab)
    for number in numbers:
        assert number in ids
    # every agent's cache learned every identity through its watch
    for client in agents:
        until(lambda c=client: set(numbers) <= {i["id"] for i in c.get("/v1/identity")},
              what="identities in every agent's cache")


def _land(lab, ship):
    url = f"http://{lab.pod('deathstar')['ip']}/v1/request-landing"
    proc = lab.exec(ship, ["curl", "-s", "--max-time", "1", "-XPOST", url], timeout=20)
    return proc.returncode == 0 and proc.stdout == "Ship landed\n"


def test_etcd_outage_keeps_enforcement_reports_degraded_and_resyncs(lab, example_policies):
    agents = clients(lab)
    sock1 = lab.node("node1")["socket"]
    subprocess.run([PYLIUM, "-H", sock1, "policy", "import",
                    str(example_policies / "l3-l4-rule1.yaml")],
                   capture_output=True, text=True, check=True)
    until(lambda: _land(lab, "tiefighter") and not _land(lab, "xwing"),
          what="rule1 enforced")
    ipcaches = {n: _bpf_ipcache(lab, n) for n in agents}
    ids_before = check_identities_unique(lab)
    web2_ip = lab.pod("web2")["ip"]
    web2_identity = agents["node2"].get("/v1/endpoint/web2")["identity"]
    lab.kvstore_stop()
    try:
        for name, client in agents.items():
            status = until(lambda c=client: (s := c.get("/v1/status"))["kvstore"].get(
                "cluster") == "degraded" and s, what=f"{name} degraded")
            assert status["healthy"] is False
        text = subprocess.run([PYLIUM, "-H", sock1, "status"], capture_output=True,
                              text=True).stdout
        assert "cluster state: degraded" in text and "Degraded" in text
        # a pod goes away while the store is down: its entry must not survive the outage
        lab.remove_pod("web2")
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            assert _land(lab, "tiefighter"), "allowed traffic broke during the outage"
            assert not _land(lab, "xwing"), "denied traffic passed during the outage"
        # the datapath kept every remote entry (nobody could tell it otherwise)
        for name in ("node1", "node3"):
            assert _bpf_ipcache(lab, name) == ipcaches[name]
    finally:
        lab.kvstore_start()
    for name, client in agents.items():
        until(lambda c=client: c.get("/v1/status")["kvstore"].get("cluster") == "ok",
              what=f"{name} recovered")
    for name, client in agents.items():
        if name == "node2":
            continue
        until(lambda c=client: ipcache_in_sync(c), what=f"{name} ipcache == store")
        assert f"{web2_ip}/32" not in _bpf_ipcache(lab, name), "stale entry after outage"
    assert not [i for i in kv_list(lab, "pylium/state/ip/v1/") if web2_ip in i["key"]]
    # the reference the outage kept is dropped, and nobody else uses web2's identity: it is
    # collected (two gc passes, 2 s apart)
    until(lambda: web2_identity not in check_identities_unique(lab), timeout=30,
          what="web2's identity collected")
    ids_after = check_identities_unique(lab)
    # nothing in use was lost: every identity before the outage is still there
    in_use = {e["identity"] for n in agents.values() for e in n.get("/v1/endpoint")}
    assert in_use <= set(ids_after)
    assert {k: v for k, v in ids_before.items() if k in in_use} == \
        {k: v for k, v in ids_after.items() if k in in_use}
    assert _land(lab, "tiefighter") and not _land(lab, "xwing")


def test_a_node_killed_without_cleanup_is_dropped_by_the_others(lab):
    agents = clients(lab, ("node1", "node2"))
    db3_ip = lab.pod("db3")["ip"]
    for client in agents.values():
        until(lambda c=client: any(e["ip"] == db3_ip for e in
                                   c.get("/v1/cluster/ipcache")["entries"]),
              what="db3 known")
    pid = lab.node("node3")["agent_pid"]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for name, client in agents.items():
        until(lambda c=client: [n["name"] for n in c.get("/v1/cluster/nodes")]
              == ["node1", "node2"], timeout=LEASE_TTL * 3 + 10, what=f"{name} drops node3")
        until(lambda n=name: f"{db3_ip}/32" not in _bpf_ipcache(lab, n), timeout=10,
              what=f"{name} drops db3's ipcache entry")
        assert ipcache_in_sync(client)
    assert time.monotonic() - killed_at < LEASE_TTL * 3 + 10
    # nothing of node3 is left: node entry, endpoints and identity references were all
    # on its one lease
    assert not [i for i in kv_list(lab, "pylium/state/") if "node3" in json.dumps(i)]
