"""CNI ADD latency with 20 pods added at once: `pylium-cni` (against a real agent in a lab
node) vs the reference `bridge` + `host-local` plugins (Debian's containernetworking-plugins)
on the same machine in the same run. Each ADD is timed as a runtime sees it: from exec
(inside the node netns, config on stdin) to exit. Rounds alternate the two so drift hits
both; every round ends with a DEL of each pod. Goal (issue 17): p50 <= 50 ms and
p99 <= 200 ms for pylium-cni; the ratio lines are pylium / reference (lower is better).
A third line is the latency of one ADD at a time (no queueing behind other pods)."""

from __future__ import annotations

import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402
from pylium.datapath import netns as plumbing  # noqa: E402
from pylium.lab.lab import Lab  # noqa: E402

PODS = 20
ROUNDS = 3
SERIAL = 10
PLUGIN = str(Path(sys.executable).with_name("pylium-cni"))
REFERENCE = "/usr/lib/cni/bridge"


def invoke(argv: list[str], node_ns: str, env: dict[str, str], conf: dict) -> float:
    """Run one plugin call; returns its wall time in ms (raises if it failed)."""
    start = time.perf_counter()
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{node_ns}", "--", *argv],
                          input=json.dumps(conf).encode(), capture_output=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=120, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {env['CNI_COMMAND']} failed: {proc.stdout!r} "
                           f"{proc.stderr!r}")
    return elapsed


def env(command: str, cid: str, netns: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def round_of(argv: list[str], node_ns: str, conf: dict, pods: list[str], tag: str) -> list[float]:
    """ADD every pod at once (timed), then DEL them all."""
    cids = [f"{tag}{i}" for i in range(len(pods))]
    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        times = list(pool.map(lambda i: invoke(argv, node_ns, env("ADD", cids[i], pods[i]),
                                               conf), range(len(pods))))
        list(pool.map(lambda i: invoke(argv, node_ns, env("DEL", cids[i], pods[i]), conf),
                      range(len(pods))))
    return times


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    suffix = secrets.token_hex(3)
    lab = Lab("b" + suffix)
    made: list[str] = []
    data_dir = tempfile.mkdtemp(prefix=f"bench-cni-{suffix}-")
    try:
        lab.up()
        node = lab.node()
        ref_node = f"bc{suffix}-node"
        plumbing.create_netns(ref_node)
        made.append(ref_node)
        ours_pods, ref_pods = [], []
        for i in range(PODS):
            for group, prefix in ((ours_pods, "p"), (ref_pods, "r")):
                name = f"bc{suffix}-{prefix}{i}"
                plumbing.create_netns(name)
                made.append(name)
                group.append(name)
        ours_conf = {"cniVersion": "1.0.0", "name": "pylium", "type": "pylium-cni",
                     "socket": node["socket"]}
        ref_conf = {"cniVersion": "1.0.0", "name": "ref", "type": "bridge",
                    "bridge": f"br{suffix}", "isGateway": True,
                    "ipam": {"type": "host-local", "subnet": "10.78.0.0/24",
                             "dataDir": data_dir, "routes": [{"dst": "0.0.0.0/0"}]}}
        ours: list[float] = []
        ref: list[float] = []
        for r in range(ROUNDS):
            ref += round_of([REFERENCE], ref_node, ref_conf, ref_pods, f"ref{r}x")
            ours += round_of([PLUGIN], node["netns"], ours_conf, ours_pods, f"pyl{r}x")
        # one pod at a time: the latency of a lone ADD, without queueing behind others
        ours_one = [round_of([PLUGIN], node["netns"], ours_conf, [pod], f"one{i}x")[0]
                    for i, pod in enumerate(ours_pods[:SERIAL])]
        ref_one = [round_of([REFERENCE], ref_node, ref_conf, [pod], f"one{i}x")[0]
                   for i, pod in enumerate(ref_pods[:SERIAL])]
        report("cni", "add_latency_single_p50", "ms", statistics.median(ours_one),
               statistics.median(ref_one), "bridge+host-local",
               "one ADD at a time (ratio: lower is better)", samples=SERIAL)
        extra = {"pods": PODS, "rounds": ROUNDS, "samples": len(ours)}
        report("cni", "add_latency_p50", "ms", statistics.median(ours), statistics.median(ref),
               "bridge+host-local", "pylium p50 <= 50 ms (ratio: lower is better)", **extra)
        report("cni", "add_latency_p99", "ms", p99(ours), p99(ref), "bridge+host-local",
               "pylium p99 <= 200 ms (ratio: lower is better)", **extra)
    finally:
        lab.down()
        for name in made:
            plumbing.remove_netns(name)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
