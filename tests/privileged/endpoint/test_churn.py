"""Issue 15 item 4: endpoints created and deleted concurrently through the agent API (as the
CNI plugin and the lab do) while policies are imported and removed; afterwards nothing
leaked and every remaining endpoint's datapath verdicts equal the reference evaluator's.

Sizes: `PYLIUM_CHURN_ENDPOINTS` endpoints in all (default 60; 200 in `make soak`),
`PYLIUM_CHURN_PARALLEL` at a time (default 10; 20 in soak), of which `PYLIUM_CHURN_KEEP`
stay to the end (default 8). Every third endpoint sends a ping to the world before it goes
(a conntrack entry to clean), every seventh has a label set of its own (an identity that
must be released), and the policy thread keeps importing and deleting eight policies that
select and admit the endpoints' five apps.

Leaks looked for, each against the state before the churn: endpoints (API), IPAM
allocations, lxc veths and /32 routes in the node, endpoint map and ipcache entries,
per-endpoint policy maps (the outer map's keys), conntrack entries of deleted endpoints,
pins under the node's bpffs root, identity references (local users and the store's refs)."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import random
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pylium.datapath import netns as plumbing
from pylium.identity.allocator import decode_labels
from pylium.identity.model import RESERVED_IDENTITIES, Identity
from pylium.lab.lab import Lab
from pylium.policy import evaluate
from pylium.policy.load import load_text
from pylium.policy.mapstate import Direction

from .eplab import api

TOTAL = int(os.environ.get("PYLIUM_CHURN_ENDPOINTS", "60"))
PARALLEL = int(os.environ.get("PYLIUM_CHURN_PARALLEL", "10"))
KEEP = int(os.environ.get("PYLIUM_CHURN_KEEP", "8"))
APPS = 5
POLICIES = 8
WORLD_IP = "198.51.100.10"
PORTS = (80, 81, 84, 87, 443, 8000, 8003, 8006)


def policy_text(k: int) -> str:
    """churn-k: app a(k%5) admits a(k+1) on port 80+k and may talk to a(k+2) on 8000+k;
    every other one also reaches the world on 443."""
    egress = [f"- toEndpoints: [{{matchLabels: {{app: a{(k + 2) % APPS}}}}}]\n"
              f"    toPorts: [{{ports: [{{port: \"{8000 + k}\", protocol: TCP}}]}}]"]
    if k % 2 == 0:
        egress.append("- toEntities: [world]\n"
                      "    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]")
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: churn-{k}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a{k % APPS}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: a{(k + 1) % APPS}}}}}]
    toPorts: [{{ports: [{{port: "{80 + k}", protocol: TCP}}]}}]
  egress:
  {chr(10).join('  ' + e if i else e for i, e in enumerate(egress))}
"""


@pytest.fixture(scope="module")
def lab():
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    lab = Lab("ch" + secrets.token_hex(3))
    try:
        lab.up(nodes=1)
        yield lab
    finally:
        lab.down()


def wait_idle(client, timeout=60.0):
    deadline = time.monotonic() + timeout
    while client.get("/v1/endpoint-regeneration")["busy"]:
        assert time.monotonic() < deadline, "regeneration still busy"
        time.sleep(0.05)


def snapshot(lab) -> dict:
    """Everything an endpoint leaves behind, as comparable sets."""
    node = lab.node()
    client = api(lab)
    pod_cidr = ipaddress.ip_network(node["pod_cidr"])
    ipam = json.loads(Path(node["state_dir"], "ipam.json").read_text())["allocated"]
    links = {link.ifname for link in plumbing.list_links(node["netns"])
             if link.ifname.startswith("lxc")}
    routes = {r["dst"] for r in plumbing.routes(node["netns"])
              if r["dst"].endswith("/32") and ipaddress.ip_network(r["dst"]).subnet_of(pod_cidr)}
    bpf_eps = {(r["ep_id"], r["ipv4"]) for r in client.get("/v1/bpf/endpoints")}
    ipcache = {r["cidr"] for r in client.get("/v1/bpf/ipcache")
               if r["cidr"].endswith("/32")
               and ipaddress.ip_network(r["cidr"]).subnet_of(pod_cidr)}
    outer = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                            str(Path(node["bpffs_root"]) / "policy")],
                           capture_output=True, text=True, check=True).stdout
    policy_maps = {int.from_bytes(bytes(int(b, 16) for b in row["key"]), "little")
                   for row in json.loads(outer)}
    pins = {str(p.relative_to(node["bpffs_root"])) for p in Path(node["bpffs_root"]).rglob("*")}
    refs = {i["key"] for i in client.get(
        "/v1/kvstore/list?prefix=pylium/state/identities/v1/refs/")["items"]}
    return {"endpoints": {e["name"] for e in client.get("/v1/endpoint")},
            "ipam": set(ipam), "links": links, "routes": routes, "bpf_endpoints": bpf_eps,
            "ipcache": ipcache, "policy_maps": policy_maps, "pins": pins,
            "local_refs": client.get("/v1/identity/references"), "kv_refs": refs,
            "ct": client.get("/v1/bpf/ct")}


class PolicyChurn(threading.Thread):
    """Imports and deletes churn-k policies in a loop; `live` is what is imported now."""

    def __init__(self, lab, seed: int):
        super().__init__(daemon=True)
        self.client = api(lab)
        self.rng = random.Random(seed)
        self.live: set[int] = set()
        self.changes = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                k = self.rng.randrange(POLICIES)
                if k in self.live and len(self.live) <= POLICIES // 2:
                    # keep about half of them in force: the end state has several to check
                    k = self.rng.choice([n for n in range(POLICIES) if n not in self.live])
                if k in self.live:
                    self.client.delete(f"/v1/policy?name=churn-{k}&namespace=default")
                    self.live.discard(k)
                else:
                    self.client.post("/v1/policy", {"text": policy_text(k),
                                                    "name": f"churn-{k}"})
                    self.live.add(k)
                self.changes += 1
                time.sleep(self.rng.uniform(0.0, 0.2))
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


@pytest.fixture
def pod_netns(lab):
    """The pods' namespaces (made here, as a container runtime would): all removed after."""
    made: list[str] = []
    yield made
    for netns in made:
        plumbing.remove_netns(netns)


def test_churn_leaks_nothing_and_leaves_policy_as_the_evaluator_says(lab, pod_netns):
    client = api(lab)
    before = snapshot(lab)
    rng = random.Random(15)
    keep = set(rng.sample(range(TOTAL), KEEP))
    kept: dict[int, dict] = {}
    gone_ips: set[str] = set()
    ct_made: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        worker = api(lab)
        name = f"c{i}"
        netns = plumbing.create_netns(f"{lab.name}-c{i}").name
        with lock:
            pod_netns.append(netns)
        try:
            labels = {"app": f"a{i % APPS}"}
            if i % 7 == 0:
                labels["solo"] = f"s{i}"
            ep = worker.put(f"/v1/endpoint/{name}", {"namespace": "default",
                                                     "labels": labels, "netns": netns})
            if i % 3 == 0:
                plumbing_ping(netns)
                if any(r["src"] == ep["ipv4"] for r in worker.get("/v1/bpf/ct")):
                    with lock:
                        ct_made.append(i)
            if i in keep:
                with lock:
                    kept[i] = ep
                return
            worker.delete(f"/v1/endpoint/{name}")
            with lock:
                gone_ips.add(ep["ipv4"])
        finally:
            if i not in keep:
                plumbing.remove_netns(netns)
                with lock:
                    pod_netns.remove(netns)

    policies = PolicyChurn(lab, seed=TOTAL)
    started = time.monotonic()
    policies.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            for future in [pool.submit(one, i) for i in range(TOTAL)]:
                future.result()
    finally:
        policies.stop.set()
        policies.join(60)
    churn_s = time.monotonic() - started
    assert policies.error is None, policies.error
    wait_idle(client)
    after = snapshot(lab)
    print(f"\nchurn: {TOTAL} endpoints ({PARALLEL} at a time, {KEEP} kept), "
          f"{policies.changes} policy imports/deletes in {churn_s:.1f}s; live policies "
          f"{sorted(policies.live)}")
    assert policies.changes >= 5
    assert ct_made, "no ping made a conntrack entry: the CT leak check would be empty"

    kept_eps = {client.get(f"/v1/endpoint/c{i}")["id"]: client.get(f"/v1/endpoint/c{i}")
                for i in kept}
    kept_ips = {e["ipv4"] for e in kept_eps.values()}
    assert after["endpoints"] == before["endpoints"] | {f"c{i}" for i in kept}
    assert after["ipam"] == before["ipam"] | kept_ips
    assert after["links"] == before["links"] | {e["ifname"] for e in kept_eps.values()}
    assert after["routes"] == before["routes"] | {f"{ip}/32" for ip in kept_ips}
    assert after["bpf_endpoints"] == before["bpf_endpoints"] | {
        (ep_id, e["ipv4"]) for ep_id, e in kept_eps.items()}
    assert after["ipcache"] == before["ipcache"] | {f"{ip}/32" for ip in kept_ips}
    assert after["policy_maps"] == before["policy_maps"] | set(kept_eps)
    assert after["pins"] == before["pins"]
    leftover_ct = [r for r in after["ct"] if r["ep_id"] not in kept_eps
                   and r not in before["ct"]]
    assert not leftover_ct, leftover_ct[:5]
    assert not [r for r in after["ct"] if r["src"] in gone_ips or r["dst"] in gone_ips]
    # identity references: back to the baseline plus exactly the kept endpoints' users
    want_refs: dict[str, int] = dict(before["local_refs"])
    for e in kept_eps.values():
        want_refs[str(e["identity"])] = want_refs.get(str(e["identity"]), 0) + 1
    assert after["local_refs"] == want_refs
    kv_numbers = {int(k.split("/")[-2]) for k in after["kv_refs"]}
    assert kv_numbers == {int(n) for n in want_refs}

    check_verdicts(lab, kept_eps, policies.live)


def plumbing_ping(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", WORLD_IP],
                   capture_output=True, check=False, timeout=20)


def check_verdicts(lab, kept_eps: dict[int, dict], live: set[int]) -> None:
    """The kernel's verdict (BPF test run through `/v1/bpf/trace`) for every kept endpoint,
    both directions, every peer (each kept endpoint and the world) and every port the
    policies name (and some they do not), equals the reference evaluator's on the policies
    imported now."""
    client = api(lab)
    rules = [p for k in sorted(live) for p in load_text(policy_text(k), f"churn-{k}")]
    identities = {i["id"]: Identity(i["id"], decode_labels(json.dumps(i["labels"]).encode()))
                  for i in client.get("/v1/identity") if i["id"] >= 256}
    world = RESERVED_IDENTITIES[2]
    peers = [(e["ipv4"], identities[e["identity"]]) for e in kept_eps.values()]
    peers.append((WORLD_IP, world))
    cases = mismatches = 0
    outcomes: dict[str, int] = {}
    failures = []
    for ep_id, ep in kept_eps.items():
        subject = identities[ep["identity"]].labels
        for peer_ip, peer in peers:
            if peer_ip == ep["ipv4"]:
                continue
            for port in PORTS:
                for direction in (Direction.INGRESS, Direction.EGRESS):
                    want = evaluate.direction_verdict(rules, subject, peer, direction, 6, port)
                    ingress = direction == Direction.INGRESS
                    got = client.post("/v1/bpf/trace", {
                        "ep_id": ep_id, "direction": "ingress" if ingress else "egress",
                        "src_ip": peer_ip if ingress else ep["ipv4"],
                        "dst_ip": ep["ipv4"] if ingress else peer_ip,
                        "sport": 40000 + port, "dport": port, "proto": 6,
                        "src_identity": peer.id if ingress else None})
                    cases += 1
                    outcomes[want.verdict.value] = outcomes.get(want.verdict.value, 0) + 1
                    if got["verdict"] != want.verdict.value:
                        mismatches += 1
                        failures.append((ep["name"], direction.name, peer_ip, port,
                                         want.verdict.value, got["verdict"]))
    print(f"verdicts: {cases} (endpoint, peer, port, direction) cases {outcomes}, "
          f"{mismatches} differ from the reference evaluator")
    assert cases >= KEEP * 8
    assert outcomes.get("allowed", 0) and outcomes.get("denied", 0), outcomes
    assert not failures, failures[:10]
