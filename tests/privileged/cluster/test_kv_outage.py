"""Issue 15 item 3: a KV-store outage neither opens nor closes the network, and the cluster
recovers from an etcd that comes back empty, without restarting agents.

Two real agents (lab nodes) share one real etcd in the lab's namespace. The Star Wars pods
live on node1; node2 has a second tiefighter and xwing, so probes cross nodes through the
ipcache and the deathstar service. Two faults:

* etcd stopped for `PYLIUM_KV_OUTAGE_S` seconds (10 here, 60 in `make soak`): the
  allowed flows pass and the denied ones never do, probed throughout; a pod created during
  the outage with labels its node already uses works (and is denied where its peers are);
  one with a new label set fails with a clear error and leaks nothing; afterwards identities
  are unique, every agent's ipcache equals the store, and nodes and services are as before.
* etcd restarted with a wiped data dir: the agents (same pids) write back their node,
  endpoints, identities with the numbers they use, and the services, while the datapath
  keeps enforcing; a label set allocated afterwards gets a number nobody uses."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pylium.agent.client import AgentClient
from pylium.errors import PyliumError
from pylium.lab.lab import Lab

PYLIUM = str(Path(sys.executable).with_name("pylium"))
LEASE_TTL = 3
OUTAGE_S = float(os.environ.get("PYLIUM_KV_OUTAGE_S", "10"))
NODES = ("node1", "node2")
SERVICE_VIP = "10.96.0.10"
STATE = "pylium/state/"


def until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except PyliumError as exc:  # the agent answers 503 while the store is away
            last = str(exc)
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def lab(example_policies):
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=False)
    lab = Lab("kv" + secrets.token_hex(3))
    try:
        lab.up(nodes=len(NODES), demo="starwars", kvstore="etcd", routing="vxlan",
               agent_settings={"plugin_options": {"cluster": {
                   "lease_ttl": LEASE_TTL, "identity_gc_interval": 2}}})
        lab.add_pod("tie2", {"org": "empire", "class": "tiefighter"}, node="node2")
        lab.add_pod("xw2", {"org": "alliance", "class": "xwing"}, node="node2")
        subprocess.run([PYLIUM, "-H", lab.node("node1")["socket"], "policy", "import",
                        str(example_policies / "l3-l4-rule1.yaml")],
                       capture_output=True, text=True, check=True)
        until(lambda: all(_land(lab, s, t) for s, t in ALLOWED)
              and not any(_land(lab, s, t) for s, t in DENIED), what="rule1 enforced")
        yield lab
    finally:
        lab.down()


ALLOWED = (("tiefighter", "deathstar"), ("tie2", "deathstar"), ("tie2", "vip"))
DENIED = (("xwing", "deathstar"), ("xw2", "deathstar"), ("xw2", "vip"))


def _land(lab, ship, target):
    ip = SERVICE_VIP if target == "vip" else lab.pod(target)["ip"]
    proc = lab.exec(ship, ["curl", "-s", "--max-time", "1", "-XPOST",
                           f"http://{ip}/v1/request-landing"], timeout=20)
    return proc.returncode == 0 and proc.stdout == "Ship landed\n"


class Prober:
    """Probes every allowed and denied flow in a loop until stopped: counts allowed flows
    that failed and denied flows that passed (each must stay 0)."""

    def __init__(self, lab):
        self.lab = lab
        self.rounds = self.allowed_failed = self.denied_passed = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for ship, target in ALLOWED:
                if not _land(self.lab, ship, target):
                    self.allowed_failed += 1
                    self.failures.append(f"{ship}->{target} refused at {time.time():.1f}")
            for ship, target in DENIED:
                if _land(self.lab, ship, target):
                    self.denied_passed += 1
                    self.failures.append(f"{ship}->{target} PASSED at {time.time():.1f}")
            self.rounds += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def clients(lab):
    return {n: AgentClient(lab.node(n)["socket"], timeout=30) for n in NODES}


def kv_list(lab, prefix):
    return AgentClient(lab.node("node1")["socket"], timeout=30).get(
        f"/v1/kvstore/list?prefix={prefix}")["items"]


def store_identities(lab) -> dict[int, tuple[str, ...]]:
    """Every number names one label set and every label set has one number; the index
    (`value/`) names only existing numbers."""
    ids = {int(i["key"].rsplit("/", 1)[1]): tuple(i["value"])
           for i in kv_list(lab, STATE + "identities/v1/id/")}
    assert len(set(ids.values())) == len(ids), f"a label set has two identities: {ids}"
    for item in kv_list(lab, STATE + "identities/v1/value/"):
        assert int(item["value"]) in ids, f"index {item['key']} names a missing identity"
    return ids


def endpoint_identities(lab) -> dict[str, int]:
    return {f"{n}/{e['name']}": e["identity"] for n, c in clients(lab).items()
            for e in c.get("/v1/endpoint")}


def services(lab):
    return sorted((s["spec"]["id"], s["spec"]["flags"]["name"],
                   json.dumps(s["spec"]["frontend-address"], sort_keys=True),
                   json.dumps(s["spec"]["backend-addresses"], sort_keys=True))
                  for s in AgentClient(lab.node("node2")["socket"]).get("/v1/service"))


def converged(lab) -> dict:
    """What a converged cluster looks like; fails (AssertionError) if it is not yet."""
    agents = clients(lab)
    for name, client in agents.items():
        assert client.get("/v1/status")["kvstore"].get("cluster") == "ok", f"{name} degraded"
        assert sorted(n["name"] for n in client.get("/v1/cluster/nodes")) == list(NODES)
        report = client.get("/v1/cluster/ipcache")
        assert not (report["missing"] or report["stale"] or report["different"]), \
            f"{name} ipcache != store: {report}"
    ids = store_identities(lab)
    in_use = endpoint_identities(lab)
    for endpoint, number in in_use.items():
        assert number in ids, f"{endpoint} uses identity {number}, missing from the store"
    assert sorted(i["key"].rsplit("/", 1)[1] for i in kv_list(lab, STATE + "nodes/v1/")) \
        == list(NODES)
    published = {i["key"].rsplit("/", 1)[1] for i in kv_list(lab, STATE + "ip/v1/")}
    pods = {p["ip"] for p in lab.status()["pods"]}
    assert pods <= published, f"pods missing from the store: {pods - published}"
    for name, client in agents.items():  # every agent resolves every identity in use
        known = {i["id"]: tuple(i["labels"]) for i in client.get("/v1/identity")}
        for number in set(in_use.values()):
            assert number in known, f"{name} does not know identity {number}"
    return {"ids": ids, "in_use": in_use}


def wait_converged(lab, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return converged(lab)
        except (AssertionError, PyliumError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _remote_ipcache(lab, node) -> dict[str, tuple[int, str]]:
    """The remote pods in a node's BPF ipcache: /32 → (identity, tunnel endpoint)."""
    rows = AgentClient(lab.node(node)["socket"]).get("/v1/bpf/ipcache")
    return {r["cidr"]: (r["identity"], r["tunnel_endpoint"]) for r in rows
            if r["cidr"].endswith("/32") and r.get("tunnel_endpoint")
            and r["cidr"].startswith("10.200.")}


def agent_pids(lab):
    return {n: lab.node(n)["agent_pid"] for n in NODES}


def test_etcd_stopped_keeps_enforcement_and_the_cluster_converges_after(lab):
    before = wait_converged(lab)
    svc_before = services(lab)
    assert svc_before, "the demo's deathstar service is missing"
    pids = agent_pids(lab)
    late = None
    lab.kvstore_stop()
    try:
        with Prober(lab) as probe:
            for name, client in clients(lab).items():
                until(lambda c=client: c.get("/v1/status")["kvstore"].get("cluster")
                      == "degraded", what=f"{name} degraded")
            started = time.monotonic()
            # a new pod whose labels an endpoint of its node already has: its identity is
            # the node's already, so it is wired while the store is down, and enforced
            lab.add_pod("xw3", {"org": "alliance", "class": "xwing"}, node="node2")
            assert not _land(lab, "xw3", "deathstar") and not _land(lab, "xw3", "vip")
            # a new label set needs the store: the pod fails clearly, leaving nothing behind
            try:
                late = lab.add_pod("late", {"app": "late"}, node="node2")
                outcome = "worked"
            except PyliumError as exc:
                message = str(exc)
                assert "Traceback" not in message and len(message.splitlines()) == 1
                assert "kvstore" in message.lower() or "etcd" in message.lower(), message
                eps = clients(lab)["node2"].get("/v1/endpoint")
                assert "late" not in {e["name"] for e in eps}
                outcome = f"refused: {message}"
            print(f"\na pod with a new label set during the outage: {outcome}")
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
        print(f"\nkv outage {OUTAGE_S:g}s: {probe.rounds} probe rounds, "
              f"{probe.allowed_failed} allowed refused, {probe.denied_passed} denied passed")
        assert probe.rounds >= 2
        assert probe.denied_passed == 0, probe.failures
        assert probe.allowed_failed == 0, probe.failures
    finally:
        lab.kvstore_start()
    after = wait_converged(lab)
    assert agent_pids(lab) == pids
    assert after["in_use"]["node2/xw3"] == before["in_use"]["node2/xw2"]
    assert not _land(lab, "xw3", "deathstar") and not _land(lab, "xw3", "vip")
    for endpoint, number in before["in_use"].items():
        assert after["in_use"][endpoint] == number
        assert after["ids"][number] == before["ids"][number]
    assert services(lab) == svc_before
    if late is None:  # the store is back: the same pod now works, with a new identity
        late = lab.add_pod("late", {"app": "late"}, node="node2")
    assert not _land(lab, "late", "deathstar"), "app=late is not allowed by rule1"
    final = wait_converged(lab)
    assert final["in_use"]["node2/late"] not in before["ids"]
    lab.remove_pod("late")


def test_etcd_back_with_a_wiped_data_dir_is_rebuilt_from_the_agents(lab):
    before = wait_converged(lab)
    svc_before = services(lab)
    seed_before = [i["value"] for i in kv_list(lab, STATE + "services/v1/maglev-seed")]
    pids = agent_pids(lab)
    remote = {n: _remote_ipcache(lab, n) for n in NODES}
    assert all(remote.values())
    flaps: list[str] = []
    stop = threading.Event()

    def watch_ipcaches():
        """The datapath keeps every remote entry while the owners write them back."""
        while not stop.is_set():
            for node in NODES:
                try:
                    now = _remote_ipcache(lab, node)
                except PyliumError:
                    continue
                if now != remote[node]:
                    flaps.append(f"{node}: {now} at {time.time():.1f}")
            time.sleep(0.1)

    sampler = threading.Thread(target=watch_ipcaches, daemon=True)
    sampler.start()
    try:
        with Prober(lab) as probe:
            lab.kvstore_stop(wipe=True)
            time.sleep(2)
            lab.kvstore_start()
            after = wait_converged(lab, timeout=90)
            time.sleep(2)  # a few probe rounds after convergence too
    finally:
        stop.set()
        sampler.join(10)
    assert not flaps, flaps[:5]
    print(f"\nwiped etcd: {probe.rounds} probe rounds, {probe.allowed_failed} allowed "
          f"refused, {probe.denied_passed} denied passed")
    assert probe.denied_passed == 0, probe.failures
    assert probe.allowed_failed == 0, probe.failures
    assert agent_pids(lab) == pids, "an agent restarted"
    statuses = [c.get("/v1/cluster") for c in clients(lab).values()]
    assert all(s["wipes"] >= 1 for s in statuses), statuses
    # every identity in use is back with its number and labels; nothing else claims them
    assert after["in_use"] == before["in_use"]
    for number in set(after["in_use"].values()):
        assert after["ids"][number] == before["ids"][number]
    refs = {int(i["key"].split("/")[-2]) for i in kv_list(lab, STATE + "identities/v1/refs/")}
    assert set(after["in_use"].values()) <= refs
    assert services(lab) == svc_before
    assert [i["key"] for i in kv_list(lab, STATE + "services/v1/svc/")] == \
        [f"{STATE}services/v1/svc/default/deathstar"]
    assert [i["value"] for i in kv_list(lab, STATE + "services/v1/maglev-seed")] == \
        seed_before
    # a label set allocated now cannot take a number in use
    fresh = clients(lab)["node1"].post("/v1/cluster/identities",
                                       {"labels": ["app=after-wipe"]})["id"]
    assert fresh not in before["ids"]
    store_identities(lab)
    assert all(_land(lab, s, t) for s, t in ALLOWED)
    assert not any(_land(lab, s, t) for s, t in DENIED)
