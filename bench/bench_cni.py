"""CNI ADD latency, one pod at a time and 20 pods at once: `pylium-cni` (against a real
agent in a lab node) vs the reference `bridge` + `host-local` plugins (Debian's
containernetworking-plugins) on the same machine in the same run.

Each ADD is timed as a runtime sees it: from exec of the plugin (config on stdin) to its
exit. A kubelet/containerd execs the plugin directly in the host's netns (`CNI_NETNS` is only
a path in the environment); here the "host" is a lab node's netns, so the thread that execs
the plugin first joins that netns (setns(2) is per thread and a child inherits its parent
thread's namespaces): no `nsenter` process is started or timed, for either side. (Until
session 5 each call was wrapped in `nsenter`, which added a process start to both sides.) `pylium-cni` is what a runtime finds in its CNI bin dir
(`python -m pylium.cni.launcher DIR`, installed into a temporary dir here: the native
transport `make setup` builds, else the Python one; `plugin` in the output names it). Rounds
interleave the two sides so drift on a shared machine hits both: each round is 20 ADDs at
once for the reference then for pylium (then a DEL of every pod), followed by single ADDs
alternating reference / pylium. Every ADD is followed by its DEL; the DELs are timed too
(an extra field). Goal (issue 17): pylium-cni p50 <= 50 ms and p99 <= 200 ms with 20 pods
at once; `met` says whether the absolute goal was reached on this machine, `ratio` is
pylium / reference (lower is better), and the load averages show how busy the machine was."""

from __future__ import annotations

import ctypes
import json
import os
import resource
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
ROUNDS = int(os.environ.get("BENCH_CNI_ROUNDS", "3"))
SERIAL = 6  # single ADDs per side per round
REFERENCE = "/usr/lib/cni/bridge"
GOAL_P50_MS = 50.0
GOAL_P99_MS = 200.0


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def join_netns(node_ns: str) -> None:
    """Move the calling thread (only it) into the node's netns: the plugins it then starts
    run there, as a runtime's plugins run in the host's netns (no `nsenter` in between)."""
    fd = os.open(f"/run/netns/{node_ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {node_ns}")
    finally:
        os.close(fd)


def invoke(argv: list[str], env: dict[str, str], conf: dict) -> float:
    """Run one plugin call from this thread's netns; returns its wall time in ms (raises if
    it failed)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, input=json.dumps(conf).encode(), capture_output=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=120, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} {env['CNI_COMMAND']} failed: {proc.stdout!r} "
                           f"{proc.stderr!r}")
    return elapsed


def env(command: str, cid: str, netns: str) -> dict[str, str]:
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def round_of(argv: list[str], node_ns: str, conf: dict, pods: list[str],
             tag: str) -> tuple[list[float], list[float]]:
    """ADD every pod at once, then DEL them all at once: (ADD times, DEL times)."""
    cids = [f"{tag}{i}" for i in range(len(pods))]
    # every worker thread lives in the node netns; the pool starts them all before timing
    with ThreadPoolExecutor(max_workers=len(pods), initializer=join_netns,
                            initargs=(node_ns,)) as pool:
        list(pool.map(lambda _: time.sleep(0.02), range(len(pods))))
        adds = list(pool.map(lambda i: invoke(argv, env("ADD", cids[i], pods[i]), conf),
                             range(len(pods))))
        dels = list(pool.map(lambda i: invoke(argv, env("DEL", cids[i], pods[i]), conf),
                             range(len(pods))))
    return adds, dels


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _installed_launcher(directory: Path) -> str:
    from pylium.cni import launcher

    return str(launcher.install(directory / "bin"))


class CPU:
    """CPU time (user + system, ms) the plugin processes (this script's children) and,
    for pylium, the agent spent: a cost per ADD+DEL that the machine's load does not
    distort the way it distorts wall times."""

    def __init__(self, agent_pid: int):
        self.agent_pid = agent_pid
        self.plugin = {"ours": 0.0, "ref": 0.0}
        self.agent = 0.0

    def _children_ms(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (usage.ru_utime + usage.ru_stime) * 1000

    def _agent_ms(self) -> float:
        fields = Path(f"/proc/{self.agent_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")

    def measure(self, side: str, func, *args):
        plugin, agent = self._children_ms(), self._agent_ms()
        result = func(*args)
        self.plugin[side] += self._children_ms() - plugin
        if side == "ours":
            self.agent += self._agent_ms() - agent
        return result


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    suffix = secrets.token_hex(3)
    lab = Lab("b" + suffix)
    made: list[str] = []
    data_dir = tempfile.mkdtemp(prefix=f"bench-cni-{suffix}-")
    try:
        # BENCH_CNI_PLUGIN: another executable to race (e.g. the pip console script)
        plugin = os.environ.get("BENCH_CNI_PLUGIN") or _installed_launcher(Path(data_dir))
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
                             "dataDir": str(Path(data_dir) / "ipam"),
                             "routes": [{"dst": "0.0.0.0/0"}]}}
        ours_sides = ([plugin], node["netns"], ours_conf, ours_pods)
        ref_sides = ([REFERENCE], ref_node, ref_conf, ref_pods)
        # one untimed round each: the agent's first identity, page cache, bridge creation
        round_of(*ref_sides, "warmx")
        round_of(*ours_sides, "warmx")
        load_before = loadavg()
        cpu = CPU(int(node["agent_pid"]))
        ours, ref, ours_del, ref_del = [], [], [], []
        ours_one, ref_one, ours_one_del, ref_one_del = [], [], [], []
        for r in range(ROUNDS):
            adds, dels = cpu.measure("ref", round_of, *ref_sides, f"ref{r}x")
            ref += adds
            ref_del += dels
            adds, dels = cpu.measure("ours", round_of, *ours_sides, f"pyl{r}x")
            ours += adds
            ours_del += dels
            for i in range(SERIAL):  # one pod at a time: no queueing behind other pods
                for tag, side, times, del_times in (
                        ("ref", ref_sides, ref_one, ref_one_del),
                        ("ours", ours_sides, ours_one, ours_one_del)):
                    argv, node_ns, conf, pods = side
                    adds, dels = cpu.measure(tag, round_of, argv, node_ns, conf, [pods[i]],
                                             f"one{r}x{i}x")
                    times += adds
                    del_times += dels
        pairs = ROUNDS * (PODS + SERIAL)  # ADD+DEL pairs per side
        from pylium.cni import native

        load = {"loadavg_before": load_before, "loadavg_after": loadavg(),
                "plugin": f"{plugin} ({'native' if native.is_native(Path(plugin)) else 'python'})",
                # both sides: exec'd straight from a thread in the node netns, no nsenter
                "launch": "direct exec from the node netns (setns per thread; no nsenter)",
                # CPU per ADD+DEL pair: pylium's plugin execs and agent; the reference's execs
                "cpu_ms_per_pair": {
                    "pylium_plugin": round(cpu.plugin["ours"] / pairs, 2),
                    "pylium_agent": round(cpu.agent / pairs, 2),
                    "reference_plugin": round(cpu.plugin["ref"] / pairs, 2)}}
        name = "bridge+host-local"
        single = {"pods": 1, "rounds": ROUNDS, "samples": len(ours_one), **load,
                  "del_p50_ms": round(statistics.median(ours_one_del), 3),
                  "reference_del_p50_ms": round(statistics.median(ref_one_del), 3)}
        report("cni", "add_latency_single_p50", "ms", statistics.median(ours_one),
               statistics.median(ref_one), name,
               f"one ADD at a time: pylium p50 <= {GOAL_P50_MS:.0f} ms (ratio: lower is better)",
               met=statistics.median(ours_one) <= GOAL_P50_MS, **single)
        report("cni", "add_latency_single_p99", "ms", p99(ours_one), p99(ref_one), name,
               f"one ADD at a time: pylium p99 <= {GOAL_P99_MS:.0f} ms (ratio: lower is better)",
               met=p99(ours_one) <= GOAL_P99_MS, **single)
        many = {"pods": PODS, "rounds": ROUNDS, "samples": len(ours), **load,
                "del_p50_ms": round(statistics.median(ours_del), 3),
                "reference_del_p50_ms": round(statistics.median(ref_del), 3)}
        report("cni", "add_latency_p50", "ms", statistics.median(ours), statistics.median(ref),
               name, f"{PODS} ADDs at once: pylium p50 <= {GOAL_P50_MS:.0f} ms "
               "(issue 17; ratio: lower is better)",
               met=statistics.median(ours) <= GOAL_P50_MS, **many)
        report("cni", "add_latency_p99", "ms", p99(ours), p99(ref), name,
               f"{PODS} ADDs at once: pylium p99 <= {GOAL_P99_MS:.0f} ms "
               "(issue 17; ratio: lower is better)", met=p99(ours) <= GOAL_P99_MS, **many)
    finally:
        lab.down()
        for netns in made:
            plumbing.remove_netns(netns)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
