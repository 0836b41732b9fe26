"""Cross-node iperf3 (pod on node1 -> pod on node2) with WireGuard encryption against the same
lab without it, in one run: two labs up side by side (same routing mode, default native),
rounds alternating so drift hits both; best of each. WireGuard here is the userspace
wireguard-go (this kernel has no WireGuard module), so the figure is recorded for what it is
(PLATFORM.md measured ~0.3 Gbit/s between two namespaces); the tests check the mechanism.

    python bench/bench_wireguard.py [native|vxlan|geneve ...]"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from pylium.lab.lab import Lab  # noqa: E402

ROUNDS = 3
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


def two_pods(mode: str, settings: dict, tag: str) -> tuple[Lab, dict, dict]:
    lab = Lab(f"b{tag}{mode[0]}{uuid.uuid4().hex[:3]}")
    try:
        lab.up(nodes=2, routing=mode, agent_settings=settings)
        a = lab.add_pod("a", {"app": "a"}, node="node1")
        b = lab.add_pod("b", {"app": "b"}, node="node2")
        deadline = time.monotonic() + 30
        while lab.exec("a", ["ping", "-c", "1", "-W", "1", b["ip"]]).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: pods do not reach each other")
    except BaseException:
        lab.down()
        raise
    return lab, a, b


def bench(mode: str) -> None:
    plain = encrypted = None
    try:
        plain = two_pods(mode, {}, "p")
        encrypted = two_pods(mode, {"encryption": "wireguard"}, "w")
        base, ours = [], []
        for _ in range(ROUNDS):
            _lab, a, b = plain
            base.append(iperf(b["netns"], a["netns"], b["ip"]))
            lab, a, b = encrypted
            ours.append(iperf(b["netns"], a["netns"], b["ip"]))
        peers = lab.client("node1").get("/v1/encrypt")["peers"]
        report("wireguard", f"cross_node_tcp_wireguard_{mode}", "Gbit/s", max(ours),
               max(base), f"{mode} without encryption",
               "recorded: userspace wireguard-go (no kernel WireGuard here)",
               rounds=ROUNDS, seconds=SECONDS, runs_pylium=[round(x, 3) for x in ours],
               runs_baseline=[round(x, 2) for x in base],
               encrypted_bytes_sent=sum(p["tx_bytes"] for p in peers))
    finally:
        for made in (encrypted, plain):
            if made is not None:
                made[0].down()


def main() -> None:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=False)
    for mode in sys.argv[1:] or ["native"]:
        bench(mode)


if __name__ == "__main__":
    main()
