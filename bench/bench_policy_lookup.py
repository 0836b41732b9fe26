"""Policy enforcement per packet at 10, 1,000 and 10,000 rules, both sides on the same path.

The path: a UDP stream (iperf3, 64-byte datagrams, unlimited rate) from pod a to pod b,
routed by the node netns between their veths; cost per packet = 1 / received packets per
second. Only the enforcer differs:
- pylium: the real endpoint programs on both veths (conntrack, events and metrics on, as
  in the agent); pod b's ingress policy holds N entries, the allowing one among them.
- baseline: no BPF; an iptables FORWARD chain of N rules in the node netns (the matching
  rule last, like a policy whose allowed peer is listed last). The TCP control connection
  is accepted first on both sides.
Sizes and sides alternate round after round (5 each): medians and spread are reported.
Goals: no slower than iptables with as many rules; pylium flat (10k-rule cost <= 1.2x the
10-rule cost) while iptables degrades."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "privileged" / "datapath"))
sys.path.insert(0, str(REPO / "bench"))

from common import report, report_rounds  # noqa: E402
from netns_helpers import NetnsWorker, Topology, bpffs_root, in_ns  # noqa: E402
from pylium.datapath import Datapath, EndpointInfo  # noqa: E402
from pylium.policy.mapstate import (  # noqa: E402
    PROTO_TCP,
    PROTO_UDP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
)

SIZES = (10, 1000, 10000)
ROUNDS = 5
SECONDS = 3
A_ID, B_ID = 2101, 2102
FLAT_GOAL = 1.2


def policy_of(size: int) -> EndpointPolicy:
    """Pod b's ingress: `size` entries, of which the last two admit pod a (UDP data and the
    TCP control connection of iperf3, port 5201)."""
    rng = random.Random(size)
    entries = {}
    while len(entries) < size - 2:
        key = PolicyKey(rng.randrange(3000, 400000), Direction.INGRESS, PROTO_UDP,
                        rng.randrange(1, 65536), 16)
        entries[key] = PolicyEntry()
    for proto in (PROTO_TCP, PROTO_UDP):
        entries[PolicyKey(A_ID, Direction.INGRESS, proto, 5201, 16)] = PolicyEntry()
    return EndpointPolicy(True, False, entries, size)


def iptables_rules(size: int, a_ip: str, b_ip: str) -> str:
    rng = random.Random(size)
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A FORWARD -p tcp -j ACCEPT"]
    for _ in range(size - 2):
        lines.append(f"-A FORWARD -s 10.{rng.randrange(240, 250)}.{rng.randrange(256)}."
                     f"{rng.randrange(1, 255)}/32 -p udp --dport {rng.randrange(1, 65536)} "
                     "-j ACCEPT")
    lines += [f"-A FORWARD -s {b_ip}/32 -p udp -j ACCEPT",
              f"-A FORWARD -s {a_ip}/32 -d {b_ip}/32 -p udp --dport 5201 -j ACCEPT",
              "COMMIT", ""]
    return "\n".join(lines)


IPTABLES_OPEN = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def ns_per_packet(topo: Topology) -> float:
    out = in_ns(topo.pods["a"]["ns"], "iperf3", "-c", topo.pods["b"]["ip"], "-u", "-b", "0",
                "-l", "64", "-t", str(SECONDS), "-J", timeout=SECONDS + 30).stdout
    end = json.loads(out)["end"]["sum"]
    received = end["packets"] - end["lost_packets"]
    if received <= 0:
        raise RuntimeError("no datagram arrived: the allowing rule did not match")
    return end["seconds"] * 1e9 / received


def measure() -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    topo = Topology("benchlookup")
    worker = NetnsWorker(topo.node)
    dp = Datapath(bpffs_root(), cache_dir=Path("/tmp/pylium-test-bpf-cache"))
    server = None
    try:
        a = topo.add_pod("a", "10.234.0.10")
        b = topo.add_pod("b", "10.234.0.11")
        worker.run(dp.open)
        eps = [EndpointInfo(1, a["ip"], a["ifindex"], a["mac"], a["host_mac"], A_ID),
               EndpointInfo(2, b["ip"], b["ifindex"], b["mac"], b["host_mac"], B_ID)]
        server = subprocess.Popen(["nsenter", f"--net=/run/netns/{b['ns']}", "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

        def restore(text: str) -> None:
            subprocess.run(["nsenter", f"--net=/run/netns/{topo.node}", "iptables-restore"],
                           input=text, text=True, check=True)

        def forwarded() -> int:
            return sum(m["packets"] for m in worker.run(dp.dump_metrics)
                       if (m["reason"], m["direction"]) == (0, "ingress"))

        def with_bpf(size: int) -> float:
            for ep in eps:
                worker.run(dp.attach_endpoint, ep)
            worker.run(dp.update_policy, 1, EndpointPolicy(False, False, {}, 1))
            worker.run(dp.update_policy, 2, policy_of(size))
            try:
                before = forwarded()
                cost = ns_per_packet(topo)
                assert forwarded() > before, "traffic did not go through the programs"
                return cost
            finally:
                for ep in eps:
                    worker.run(dp.detach_endpoint, ep.ep_id)

        def with_iptables(size: int) -> float:
            restore(iptables_rules(size, a["ip"], b["ip"]))
            try:
                return ns_per_packet(topo)
            finally:
                restore(IPTABLES_OPEN)

        bpf = {size: [] for size in SIZES}
        ipt = {size: [] for size in SIZES}
        for _ in range(ROUNDS):
            for size in SIZES:
                ipt[size].append(with_iptables(size))
                bpf[size].append(with_bpf(size))
        return bpf, ipt
    finally:
        if server is not None:
            server.kill()
            server.wait()
        try:
            worker.run(dp.destroy)
        finally:
            worker.close()
            topo.destroy()


def main() -> None:
    bpf, ipt = measure()
    measures = ("ns per received 64-byte UDP datagram, pod -> node netns -> pod, iperf3 "
                "unlimited rate; whole path, only the enforcer differs")
    for size in SIZES:
        report_rounds("policy_lookup", f"ns_per_packet_{size}_rules", "ns", bpf[size],
                      ipt[size], f"iptables FORWARD chain of {size} rules on the same path",
                      "lower is better; ratio <= 1 (no slower than iptables with as many rules)",
                      lambda x, y: x <= y, measures=measures)
    med = {side: {size: statistics.median(runs[size]) for size in SIZES}
           for side, runs in (("pylium", bpf), ("iptables", ipt))}
    growth = med["pylium"][10000] / med["pylium"][10]
    report("policy_lookup", "cost_10000_over_10_rules", "x", growth,
           med["iptables"][10000] / med["iptables"][10],
           "iptables cost growth 10 -> 10,000 rules on the same path",
           f"pylium <= {FLAT_GOAL} (flat); iptables grows", met=growth <= FLAT_GOAL,
           pylium_ns=med["pylium"], iptables_ns=med["iptables"], measures=measures)


if __name__ == "__main__":
    main()
