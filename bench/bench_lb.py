"""Service load balancing, side by side in one run: new TCP connections from a pod to one
ClusterIP service (2 backends) while N services exist (N = 100, 1,000, 10,000), through

- pylium: the endpoint programs' translation (lib/lb.h maps), allow-all policy loaded;
- pylium-socket: the same, plus socket LB (bpf_sock.c on a cgroup the client runs in): the
  connect() itself goes to a backend;
- iptables: a nat chain built as kube-proxy's iptables mode does (KUBE-SERVICES with one
  rule per service -> KUBE-SVC-* with `statistic --mode random` -> KUBE-SEP-* DNAT), with
  Debian's default iptables (nft backend), no BPF;
- nftables: kube-proxy's nftables mode (a `service-ips` verdict map keyed by
  address . protocol . port -> per-service chain `numgen random mod 2 vmap` -> endpoint
  chains with `dnat`), Debian `nft`, no BPF.

The measured service is the last one installed (worst case for a linear chain). Metrics:
new connections per second (one client, sequential connect+close) and p99 connect
latency; also the time to install N services (pylium: LbMaps writes into the BPF maps,
i.e. the datapath part of what the agent does; iptables: `iptables-restore`; nftables:
`nft -f`). Everything runs in netns this script creates (node + 3 pods); nothing touches
the root namespace.

Both sides track connections with the same capacity: pylium's conntrack map is sized as the
kernel's nf_conntrack_max (`bpf_ct_global_max`; the agent's default is 65536), and closed
connections leave both tables after 10 s (FIN/RST timeouts).

Rounds interleave at each N (PYLIUM_BENCH_LB_ROUNDS, default 15): pylium's maps and the
nftables table are installed side by side (pylium's programs, attached, take the packets
before the node's stack sees them; detached, nftables translates), and each round measures
nftables, then pylium (tc), then pylium (socket LB). Then iptables replaces nftables and
its rounds alternate with pylium (tc) again. Results are the medians of the rounds, with
their spread, the median of the per-round ratios (`paired_ratio_median`) and the load
average (the machine is shared)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "privileged" / "datapath"))
sys.path.insert(0, str(REPO / "bench"))

from common import report, report_rounds  # noqa: E402
from netns_helpers import NetnsWorker, Topology, bpffs_root, in_ns  # noqa: E402
from pylium.datapath import Datapath, EndpointInfo  # noqa: E402
from pylium.datapath.lb import LbMaps  # noqa: E402
from pylium.datapath.maps.lb import LB_ALG_RANDOM  # noqa: E402
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey  # noqa: E402

SIZES = tuple(int(x) for x in os.environ.get("PYLIUM_BENCH_LB_SIZES", "100,1000,10000").split(","))
CONNECTIONS = int(os.environ.get("PYLIUM_BENCH_LB_CONNECTIONS", "2000"))
#: many short rounds: the two sides of a pair run within a second of each other, so the
#: other load on a shared machine hits both alike
ROUNDS = int(os.environ.get("PYLIUM_BENCH_LB_ROUNDS", "15"))
WARMUP = 200
PORT = 80
BACKEND_PORT = 8080
PODS = {"client": ("10.213.0.10", 3001), "web1": ("10.213.0.11", 3002),
        "web2": ("10.213.0.12", 3003)}

SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(4096)
print("ready", flush=True)
while True:
    c, _ = srv.accept(); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
ip, port, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lat = []; errors = 0
def one():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s.settimeout(1)
    t = time.perf_counter_ns()
    try:
        s.connect((ip, port)); return time.perf_counter_ns() - t
    except OSError:
        return None
    finally:
        s.close()
for _ in range(warm):
    one()
start = time.perf_counter()
done = 0
for _ in range(n):
    d = one()
    done += 1
    if d is None:
        errors += 1
        if errors > 20: break
    else: lat.append(d)
wall = time.perf_counter() - start
lat.sort()
print(json.dumps({"rate": done / wall, "p99_us": lat[int(len(lat) * 0.99) - 1] / 1000 if lat else None,
                  "p50_us": lat[len(lat) // 2] / 1000 if lat else None, "errors": errors}))
"""


def vip(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def allow_all() -> EndpointPolicy:
    return EndpointPolicy(True, True, {PolicyKey(0, Direction.INGRESS): PolicyEntry(),
                                       PolicyKey(0, Direction.EGRESS): PolicyEntry()}, 1)


def measure(topo: Topology, target: str, cgroup: Path | None = None) -> dict:
    argv = ["nsenter", f"--net=/run/netns/{topo.pods['client']['ns']}", sys.executable, "-c",
            CLIENT, target, str(PORT), str(CONNECTIONS), str(WARMUP)]
    if cgroup is not None:  # the client runs inside the socket-LB cgroup
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out)


def nf_conntrack_max() -> int:
    """The kernel's conntrack table size (the iptables/nftables sides' capacity), so
    pylium's conntrack map (`bpf_ct_global_max`) holds as many connections."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 65536


# -- pylium ------------------------------------------------------------------------------
class Pylium:
    name = "pylium (tc)"

    def __init__(self, topo: Topology, worker: NetnsWorker, eps: dict[str, EndpointInfo]):
        from pylium.datapath.sock import SocketLB

        self.topo, self.worker, self.eps = topo, worker, eps
        self.root = bpffs_root()
        self.installed = 0
        self.maps = self.sock = self.cgroup = None
        # the same connection-tracking capacity as the netfilter baselines get
        self.dp = Datapath(self.root, cache_dir=Path("/tmp/pylium-test-bpf-cache"),
                           ct_max=nf_conntrack_max())
        try:
            self.worker.run(self.dp.open)
            self.maps = LbMaps(self.root)
            cgroup = Path("/sys/fs/cgroup/unified") / f"pylium-benchlb-{os.getpid()}"
            cgroup.mkdir()
            self.cgroup = cgroup
            self.sock = SocketLB(self.dp)
            self.sock.attach(self.cgroup)
        except BaseException:
            # main() only closes a Pylium it got back: undo the half made here (pins, cgroup)
            self.close()
            raise

    def enable(self) -> None:
        for ep in self.eps.values():
            self.worker.run(self.dp.attach_endpoint, ep)
            self.worker.run(self.dp.update_policy, ep.ep_id, allow_all())

    def disable(self) -> None:
        for ep in self.eps.values():
            self.worker.run(self.dp.detach_endpoint, ep.ep_id)

    def install(self, n: int) -> float:
        t = time.perf_counter()
        self.maps.upsert_backend(1, PODS["web1"][0], BACKEND_PORT, 6)
        self.maps.upsert_backend(2, PODS["web2"][0], BACKEND_PORT, 6)
        for i in range(self.installed, n):
            self.maps.upsert_service(i + 1, vip(i), PORT, 6, [1, 2], algorithm=LB_ALG_RANDOM,
                                     lut=None)
        self.installed = max(self.installed, n)
        return time.perf_counter() - t

    def clear(self) -> None:
        for i in range(self.installed):
            self.maps.delete_service(i + 1, vip(i), PORT, 6)
        self.installed = 0

    def close(self) -> None:
        """Undo whatever exists, even of a half-built instance; the pins go last, whatever
        failed before."""
        try:
            if self.sock is not None:
                try:
                    self.sock.detach()
                finally:
                    self.sock.close()
            if self.cgroup is not None:
                self.cgroup.rmdir()
            if self.maps is not None:
                self.maps.close()
        finally:
            self.worker.run(self.dp.destroy)


# -- kube-proxy baselines ------------------------------------------------------------------
def iptables_rules(n: int) -> str:
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    body = ["-A PREROUTING -j KUBE-SERVICES"]
    backends = [PODS["web1"][0], PODS["web2"][0]]
    for i in range(n):
        svc = f"KUBE-SVC-{i:08d}"
        lines.append(f":{svc} - [0:0]")
        body.append(f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m tcp --dport {PORT} -j {svc}")
        for j, be in enumerate(backends):
            sep = f"KUBE-SEP-{i:08d}-{j}"
            lines.append(f":{sep} - [0:0]")
            if j == 0:
                body.append(f"-A {svc} -m statistic --mode random --probability 0.5 -j {sep}")
            else:
                body.append(f"-A {svc} -j {sep}")
            body.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {be}:{BACKEND_PORT}")
    return "\n".join(lines + body + ["COMMIT", ""])


def nft_rules(n: int) -> str:
    out = ["table ip kube-proxy {",
           "  chain nat-prerouting {",
           "    type nat hook prerouting priority dstnat; policy accept;",
           "    jump services",
           "  }",
           "  map service-ips {",
           "    type ipv4_addr . inet_proto . inet_service : verdict",
           "  }",
           "  chain services {",
           "    ip daddr . meta l4proto . th dport vmap @service-ips",
           "  }"]
    for j, pod in ((1, "web1"), (2, "web2")):
        out += [f"  chain endpoint-{j} {{",
                f"    meta l4proto tcp dnat to {PODS[pod][0]}:{BACKEND_PORT}", "  }"]
    for i in range(n):
        out += [f"  chain service-{i} {{",
                "    numgen random mod 2 vmap { 0 : goto endpoint-1, 1 : goto endpoint-2 }",
                "  }"]
    out.append("}")
    elements = ", ".join(f"{vip(i)} . tcp . {PORT} : goto service-{i}" for i in range(n))
    out.append(f"add element ip kube-proxy service-ips {{ {elements} }}")
    return "\n".join(out) + "\n"


class Iptables:
    name = "iptables (kube-proxy)"

    def __init__(self, node: str):
        self.node = node

    def install(self, n: int) -> float:
        rules = iptables_rules(n)
        t = time.perf_counter()
        subprocess.run(["nsenter", f"--net=/run/netns/{self.node}", "iptables-restore", "-w", "5"],
                       input=rules, text=True, check=True, capture_output=True, timeout=600)
        return time.perf_counter() - t

    def clear(self) -> None:
        in_ns(self.node, "iptables", "-w", "-t", "nat", "-F")
        in_ns(self.node, "iptables", "-w", "-t", "nat", "-X")
        in_ns(self.node, "conntrack", "-F", check=False)


class Nftables:
    name = "nftables (kube-proxy)"

    def __init__(self, node: str):
        self.node = node

    def install(self, n: int) -> float:
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(nft_rules(n))
            f.flush()
            t = time.perf_counter()
            in_ns(self.node, "nft", "-f", f.name, timeout=600)
            return time.perf_counter() - t

    def clear(self) -> None:
        in_ns(self.node, "nft", "delete", "table", "ip", "kube-proxy", check=False)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def median_of(samples: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in samples)


def main() -> None:
    topo = Topology("benchlb")
    worker = NetnsWorker(topo.node)
    servers = []
    pyl = None
    #: size -> mode -> the rounds' results; "pylium-vs-iptables": pylium (tc) rounds that
    #: alternated with iptables rounds
    results: dict[int, dict[str, list[dict]]] = {}
    installs: dict[int, dict[str, float]] = {}
    loads = [load()]
    try:
        eps = {}
        for ep_id, (name, (ip, identity)) in enumerate(PODS.items(), start=1):
            pod = topo.add_pod(name, ip)
            eps[name] = EndpointInfo(ep_id, ip, pod["ifindex"], pod["mac"], pod["host_mac"],
                                     identity)
            in_ns(pod["ns"], "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000")
            in_ns(pod["ns"], "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        for name in ("web1", "web2"):
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.pods[name]['ns']}",
                                     sys.executable, "-c", SERVER, str(BACKEND_PORT)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            servers.append(proc)
            proc.stdout.readline()
        pyl = Pylium(topo, worker, eps)
        ipt, nft = Iptables(topo.node), Nftables(topo.node)
        for n in SIZES:
            target = vip(n - 1)
            res = results.setdefault(n, {})
            installs[n] = {"pylium": pyl.install(n), "nftables": nft.install(n)}

            def run(mode: str, cgroup: Path | None = None, n=n, res=res,
                    target=target) -> None:
                r = {**measure(topo, target, cgroup), "load": load()}
                res.setdefault(mode, []).append(r)
                print(n, mode, r, file=sys.stderr, flush=True)

            for _ in range(ROUNDS):
                run("nftables")
                pyl.enable()
                run("pylium")
                run("pylium-socket", pyl.cgroup)
                pyl.disable()
            nft.clear()
            installs[n]["iptables"] = ipt.install(n)
            for _ in range(ROUNDS):
                run("iptables")
                pyl.enable()
                run("pylium-vs-iptables")
                pyl.disable()
            ipt.clear()
            pyl.clear()
            loads.append(load())
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        if pyl is not None:
            pyl.close()
        worker.close()
        topo.destroy()

    print(f"{'services':>9} {'mode':<20} {'conn/s':>9} {'p50 us':>8} {'p99 us':>8} "
          f"{'install s':>10} {'errors':>6}  (medians of {ROUNDS} rounds; load {loads})")
    for n, res in results.items():
        for mode, rounds in res.items():
            print(f"{n:>9} {mode:<20} {median_of(rounds, 'rate'):>9.0f} "
                  f"{median_of(rounds, 'p50_us'):>8.1f} {median_of(rounds, 'p99_us'):>8.1f} "
                  f"{installs[n].get(mode, float('nan')):>10.3f} "
                  f"{sum(r['errors'] for r in rounds):>6}")
    big, small = results[SIZES[-1]], results[SIZES[0]]
    at = f"{SIZES[-1]:,}"
    extra = {"load_avg": loads, "connections_per_round": CONNECTIONS}

    def rates(rounds):
        return [r["rate"] for r in rounds]

    def compare(metric, unit, ours, theirs, name, goal, met):
        """Medians decide `met`; also the per-round ratios' median and each side's best
        round (other load on the machine only ever slows a round down)."""
        paired = statistics.median(a / b for a, b in zip(ours, theirs, strict=True) if b)
        best = max if unit == "conn/s" else min
        report_rounds("lb", metric, unit, ours, theirs, name, goal, met,
                      paired_ratio_median=round(paired, 4),
                      best_ratio=round(best(ours) / best(theirs), 4), **extra)

    def p99s(rounds):
        return [r["p99_us"] for r in rounds]

    compare(f"new connections/s at {at} services vs iptables", "conn/s",
            rates(big["pylium-vs-iptables"]), rates(big["iptables"]),
            "kube-proxy iptables", ">= 5.0", lambda a, b: a >= 5.0 * b)
    compare(f"new connections/s at {at} services vs nftables", "conn/s",
            rates(big["pylium"]), rates(big["nftables"]), "kube-proxy nftables",
            ">= 1.0", lambda a, b: a >= b)
    compare(f"p99 connect latency at {at} services vs iptables", "us",
            p99s(big["pylium-vs-iptables"]), p99s(big["iptables"]),
            "kube-proxy iptables", "<= 1.0", lambda a, b: a <= b)
    compare(f"p99 connect latency at {at} services vs nftables", "us",
            p99s(big["pylium"]), p99s(big["nftables"]), "kube-proxy nftables",
            "<= 1.0", lambda a, b: a <= b)
    compare(f"socket LB new connections/s at {at} services vs nftables", "conn/s",
            rates(big["pylium-socket"]), rates(big["nftables"]), "kube-proxy nftables",
            ">= 1.0", lambda a, b: a >= b)
    compare(f"socket LB p99 connect latency at {at} services vs nftables", "us",
            p99s(big["pylium-socket"]), p99s(big["nftables"]), "kube-proxy nftables",
            "<= 1.0", lambda a, b: a <= b)
    a, b = median_of(small["pylium"], "rate"), median_of(big["pylium"], "rate")
    report("lb", f"pylium new connections/s: {SIZES[0]:,} vs {at} services", "conn/s", a, b,
           f"pylium at {at} services", "<= 1.2", met=a <= 1.2 * b, **extra)
    a, b = installs[SIZES[-1]]["pylium"], installs[SIZES[-1]]["iptables"]
    report("lb", f"install {at} services vs iptables-restore", "s", a, b, "iptables-restore",
           "<= 1.0", met=a <= b, **extra)
    a, b = installs[SIZES[-1]]["pylium"], installs[SIZES[-1]]["nftables"]
    report("lb", f"install {at} services vs nft -f", "s", a, b, "nft -f", "<= 1.0",
           met=a <= b, **extra)


if __name__ == "__main__":
    main()
