"""iperf3 pod -> pod on one node: pylium (both endpoints' programs attached, policy loaded:
1,000 rules with the allowing one among them) against the same topology without any BPF
(the node netns routes between the pods' veths). Rounds alternate so drift hits both.
Goal: pylium >= 0.95 of the no-BPF throughput."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "privileged" / "datapath"))
sys.path.insert(0, str(REPO / "bench"))

from common import report_rounds  # noqa: E402
from netns_helpers import NetnsWorker, Topology, bpffs_root, in_ns  # noqa: E402
from pylium.datapath import Datapath, EndpointInfo  # noqa: E402
from pylium.policy.mapstate import (  # noqa: E402
    PROTO_TCP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
)

ROUNDS = 5
SECONDS = 3
A_ID, B_ID = 2001, 2002


def policy(direction: Direction, peer: int) -> EndpointPolicy:
    rng = random.Random(int(direction))
    entries = {PolicyKey(rng.randrange(3000, 400000), direction, PROTO_TCP,
                         rng.randrange(1, 65536), 16): PolicyEntry() for _ in range(999)}
    entries[PolicyKey(peer, direction, PROTO_TCP, 5201, 16)] = PolicyEntry()
    return EndpointPolicy(True, True, entries, 1)


def iperf(topo: Topology) -> float:
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.pods['b']['ns']}", "iperf3",
                               "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.4)
        out = in_ns(topo.pods["a"]["ns"], "iperf3", "-c", topo.pods["b"]["ip"], "-t",
                    str(SECONDS), "-J", timeout=SECONDS + 30).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def main() -> None:
    topo = Topology("benchtput")
    worker = NetnsWorker(topo.node)
    dp = Datapath(bpffs_root(), cache_dir=Path("/tmp/pylium-test-bpf-cache"))
    try:
        a = topo.add_pod("a", "10.233.0.10")
        b = topo.add_pod("b", "10.233.0.11")
        worker.run(dp.open)
        eps = [EndpointInfo(1, a["ip"], a["ifindex"], a["mac"], a["host_mac"], A_ID),
               EndpointInfo(2, b["ip"], b["ifindex"], b["mac"], b["host_mac"], B_ID)]
        worker.run(dp.update_policy, 1, policy(Direction.EGRESS, B_ID))
        worker.run(dp.update_policy, 2, policy(Direction.INGRESS, A_ID))
        plain, bpf = [], []
        for _ in range(ROUNDS):
            plain.append(iperf(topo))
            for ep in eps:
                worker.run(dp.attach_endpoint, ep)
            bpf.append(iperf(topo))
            forwarded = {(m["reason"], m["direction"]): m["packets"] for m in worker.run(dp.dump_metrics)}
            assert forwarded.get((0, "ingress"), 0) > 0, "traffic did not go through the programs"
            for ep in eps:
                worker.run(dp.detach_endpoint, ep.ep_id)
                worker.run(dp.update_policy, ep.ep_id,
                           policy(Direction.EGRESS if ep.ep_id == 1 else Direction.INGRESS,
                                  B_ID if ep.ep_id == 1 else A_ID))
        report_rounds("throughput_same_node", "iperf3_pod_to_pod_gbps", "Gbit/s", bpf, plain,
                      "same topology, no BPF (node netns routing)", "ratio >= 0.95",
                      lambda a, b: a >= 0.95 * b,
                      measures="iperf3 TCP pod -> pod on one node; pylium: both endpoints' "
                               "programs, 1,000-rule policy")
    finally:
        try:
            worker.run(dp.destroy)
        finally:
            worker.close()
            topo.destroy()


if __name__ == "__main__":
    main()
