"""Cross-node iperf3 (pod on node1 -> pod on node2) for each routing mode in a real lab
(agents, endpoint programs, VXLAN / BPF Geneve / native routes) against the same topology
with plain routes and no BPF (node namespaces on an underlay bridge, pod veths with /32
routes, each node routing the other's pod CIDR to it; MTU 1500 everywhere). `vxlan` is the
default BPF encapsulation (no VXLAN device: tc programs on the underlay link wrap and unwrap,
as geneve does); `vxlan-device` is `plugin_options: {vxlan: {encapsulation: device}}`, the
collect_md device, the A/B. Rounds alternate baseline and mode (5 each) so drift hits both; medians
and spread; then one more run with the kernel's BPF run-time stats on (restored after),
reporting ns per run of each attached program: what the BPF side costs, so the rest of a
gap is the device or the stack. Goals: >= 0.9 native and VXLAN (issue 16), >= 0.8 geneve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, iperf, report_rounds, two_pods  # noqa: E402
from pylium.datapath import netns as plumbing  # noqa: E402
from pylium.lab.lab import Lab  # noqa: E402

MODES = tuple(m for m in os.environ.get("PYLIUM_BENCH_ROUTING_MODES",
                                        "native,vxlan,vxlan-device,geneve").split(",") if m)
GOALS = {"native": 0.9, "vxlan": 0.9, "vxlan-device": 0.9, "geneve": 0.8}
#: bench variant → (routing mode, agent settings)
VARIANTS = {"vxlan-device": ("vxlan",
                             {"plugin_options": {"vxlan": {"encapsulation": "device"}}})}
ROUNDS = 5
SECONDS = 3


STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def _bpftool(netns: str | None, *args: str):
    prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
    out = subprocess.run([*prefix, "bpftool", "-j", *args], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out)


def program_costs(lab: Lab, run) -> dict[str, dict[str, float]]:
    """The kernel's run-time stats of every tc program attached in the lab's node netns
    (endpoint and overlay programs) over one more iperf run: ns per run and runs, per
    program name. `kernel.bpf_stats_enabled` is on only for that run, then restored."""
    ids: dict[int, str] = {}
    for node in lab.status()["nodes"]:
        for entry in _bpftool(node["netns"], "net", "show"):
            for attached in entry.get("tc", []):
                ids[attached["id"]] = attached["name"]

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for prog_id in ids:
            info = _bpftool(None, "prog", "show", "id", str(prog_id))
            out[prog_id] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
        return out

    old = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        before = sample()
        run()
        after = sample()
    finally:
        STATS_SYSCTL.write_text(old)
    totals: dict[str, list[int]] = {}
    for prog_id, name in ids.items():
        t = totals.setdefault(name, [0, 0])
        t[0] += after[prog_id][0] - before[prog_id][0]
        t[1] += after[prog_id][1] - before[prog_id][1]
    return {name: {"ns_per_run": round(t / n, 1), "runs": n}
            for name, (t, n) in sorted(totals.items()) if n}


class PlainTopology:
    """Two node netns on a bridge, one pod each, plain routes, no BPF, no agent."""

    def __init__(self) -> None:
        self.prefix = f"pyl-rb{uuid.uuid4().hex[:4]}"
        self.made: list[str] = []

    def ns(self, what: str) -> str:
        name = f"{self.prefix}-{what}"
        plumbing.create_netns(name)
        self.made.append(name)
        return name

    def up(self) -> None:
        underlay = self.ns("underlay")
        plumbing.create_bridge("br0", underlay)
        self.pods = {}
        for i in (1, 2):
            node = self.ns(f"node{i}")
            plumbing.create_veth(f"n{i}", underlay, "eth0", node)
            plumbing.set_link_up(f"n{i}", underlay, master="br0")
            plumbing.add_address("eth0", f"192.168.100.{10 + i}/24", node)
            plumbing.write_sysctl(node, "net.ipv4.ip_forward", "1")
            other = 3 - i
            plumbing.add_route(f"10.200.{other}.0/24", node, gateway=f"192.168.100.{10 + other}")
            pod = self.ns(f"pod{i}")
            ip = f"10.200.{i}.2"
            plumbing.run_in_netns(node, lambda ip=ip, pod=pod, i=i: plumbing.wire_endpoint(
                f"lxc{i}", pod, ip, f"10.200.{i}.1"))
            self.pods[i] = (pod, ip)

    def down(self) -> None:
        for name in reversed(self.made):
            plumbing.remove_netns(name)


def main() -> None:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=False)
    plain = PlainTopology()
    try:
        plain.up()
        (pod1, _ip1), (pod2, ip2) = plain.pods[1], plain.pods[2]
        for mode in MODES:
            routing, settings = VARIANTS.get(mode, (mode, None))
            lab, a, b = two_pods(f"rb{mode[0]}{uuid.uuid4().hex[:3]}", routing, settings)
            try:
                ours, base = interleave(lambda a=a, b=b: iperf(b["netns"], a["netns"], b["ip"], SECONDS),
                                        lambda: iperf(pod2, pod1, ip2, SECONDS), ROUNDS)
                goal = GOALS[mode]
                costs = program_costs(lab, lambda a=a, b=b: iperf(b["netns"], a["netns"],
                                                                  b["ip"]))
                report_rounds("routing", f"cross_node_tcp_{mode}", "Gbit/s", ours, base,
                              "plain routes between the same netns shapes, no BPF",
                              f"ratio >= {goal}", lambda x, y, goal=goal: x >= goal * y,
                              seconds=SECONDS, measures="iperf3 TCP pod -> pod across two "
                              "node netns on a bridge, MTU 1500 underlay",
                              bpf_run_time=costs)
            finally:
                lab.down()
    finally:
        plain.down()


if __name__ == "__main__":
    main()
