"""Cross-node iperf3 (pod on node1 -> pod on node2) with WireGuard encryption against the same
lab without it, in one run: two labs up side by side (same routing mode, default native),
rounds interleaved (5 each) so drift hits both; medians and spread. WireGuard here is the userspace
wireguard-go (this kernel has no WireGuard module), so the figure is recorded for what it is
(PLATFORM.md measured ~0.3 Gbit/s between two namespaces); the tests check the mechanism.

    python bench/bench_wireguard.py [native|vxlan|geneve ...]"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, iperf, report_rounds, two_pods  # noqa: E402

ROUNDS = 5
SECONDS = 3


def bench(mode: str) -> None:
    plain = encrypted = None
    try:
        plain = two_pods(f"bp{mode[0]}{uuid.uuid4().hex[:3]}", mode, {})
        encrypted = two_pods(f"bw{mode[0]}{uuid.uuid4().hex[:3]}", mode,
                             {"encryption": "wireguard"})
        _lab, a, b = plain
        lab, ea, eb = encrypted
        ours, base = interleave(lambda: iperf(eb["netns"], ea["netns"], eb["ip"], SECONDS),
                                lambda: iperf(b["netns"], a["netns"], b["ip"], SECONDS), ROUNDS)
        peers = lab.client("node1").get("/v1/encrypt")["peers"]
        report_rounds("wireguard", f"cross_node_tcp_wireguard_{mode}", "Gbit/s", ours, base,
                      f"{mode} without encryption",
                      "recorded: userspace wireguard-go (no kernel WireGuard here)",
                      met=lambda _ours, _base: None, seconds=SECONDS,
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
