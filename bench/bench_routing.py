"""Cross-node iperf3 (pod on node1 -> pod on node2) for each routing mode in a real lab
(agents, endpoint programs, VXLAN / BPF Geneve / native routes) against the same topology
with plain routes and no BPF (node namespaces on an underlay bridge, pod veths with /32
routes, each node routing the other's pod CIDR to it; MTU 1500 everywhere). `vxlan-bpf` is
the vxlan mode with `plugin_options: {vxlan: {encapsulation: bpf}}` (no VXLAN device: tc
programs on the underlay link wrap and unwrap, as geneve does), the A/B against the
collect_md device. Rounds alternate baseline and mode (5 each) so drift hits both; medians
and spread. Goals: >= 0.9 native and VXLAN (issue 16), >= 0.8 geneve."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, report_rounds  # noqa: E402
from pylium.datapath import netns as plumbing  # noqa: E402
from pylium.lab.lab import Lab  # noqa: E402

MODES = ("native", "vxlan", "vxlan-bpf", "geneve")
GOALS = {"native": 0.9, "vxlan": 0.9, "vxlan-bpf": 0.9, "geneve": 0.8}
#: bench variant → (routing mode, agent settings)
VARIANTS = {"vxlan-bpf": ("vxlan", {"plugin_options": {"vxlan": {"encapsulation": "bpf"}}})}
ROUNDS = 5
SECONDS = 3


def iperf(server_ns: str, client_ns: str, server_ip: str) -> float:
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{server_ns}", "--", "iperf3", "-s",
                               "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.4)
        out = subprocess.run(["nsenter", f"--net=/run/netns/{client_ns}", "--", "iperf3", "-c",
                              server_ip, "-t", str(SECONDS), "-J"], capture_output=True,
                             text=True, timeout=SECONDS + 30, check=True).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


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
            lab = Lab(f"rb{mode[0]}{uuid.uuid4().hex[:3]}")
            routing, settings = VARIANTS.get(mode, (mode, None))
            try:
                lab.up(nodes=2, routing=routing, agent_settings=settings)
                a = lab.add_pod("a", {"app": "a"}, node="node1")
                b = lab.add_pod("b", {"app": "b"}, node="node2")
                deadline = time.monotonic() + 30
                while lab.exec("a", ["ping", "-c", "1", "-W", "1", b["ip"]]).returncode != 0:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{mode}: pods do not reach each other")
                ours, base = interleave(lambda a=a, b=b: iperf(b["netns"], a["netns"], b["ip"]),
                                        lambda: iperf(pod2, pod1, ip2), ROUNDS)
                goal = GOALS[mode]
                report_rounds("routing", f"cross_node_tcp_{mode}", "Gbit/s", ours, base,
                              "plain routes between the same netns shapes, no BPF",
                              f"ratio >= {goal}", lambda x, y, goal=goal: x >= goal * y,
                              seconds=SECONDS, measures="iperf3 TCP pod -> pod across two "
                              "node netns on a bridge, MTU 1500 underlay")
            finally:
                lab.down()
    finally:
        plain.down()


if __name__ == "__main__":
    main()
