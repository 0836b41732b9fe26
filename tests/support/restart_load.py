"""Issue 15 items 1-2: restart (or upgrade) the agent of a lab node again and again while
real traffic runs through it, and record what a user would notice.

One lab node (a real agent, the `http` L7 parser, the lb component) with pods:

- `client`   runs every load below
- `server`   iperf3 server (5201) and the deathstar HTTP server (80, for wrk)
- `web1/2`   keep-alive HTTP servers behind the service VIP:80 (lb)
- `l7srv`    a keep-alive HTTP server whose port 80 is redirected to the L7 proxy
- `intruder` denied everywhere it probes

Load: long iperf3 runs (client → server:5201; one, unless a slow machine needs another), a wrk loop (client → server:80), one
keep-alive HTTP connection through the service VIP, one through the L7 proxy (an allowed
path and a path the proxy must answer 403), and a tight loop of TCP connects from the
intruder to flows policy denies. `finish()` stops the load and returns what each saw; the
test (or `make soak`) asserts on it. `restart()` stops the agent gracefully (SIGTERM) or
with `kill -9`, starts it again and compares the state it adopted with the state before."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pylium.lab.lab import Lab

SUPPORT = Path(__file__).resolve().parent
CLIENTS = SUPPORT / "load_clients.py"
HTTP_SERVER = SUPPORT.parent / "privileged" / "l7" / "http_server.py"
WATCH = SUPPORT / "datapath_watch.py"
VIP = "10.96.15.10"
POLICY_DENIED = 133  # drop reason (bpf/lib/metrics.h, Cilium's wording "Policy denied")

POLICIES = {
    "rl-server": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rl-server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "5201", protocol: TCP}]}]
""",
    "rl-web": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rl-web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""",
    "rl-l7": """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rl-l7}
spec:
  endpointSelector: {matchLabels: {app: l7srv}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/ka.*"}]
""",
}


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class RestartLab:
    """A lab under load whose agent gets restarted; see the module docstring."""

    def __init__(self, **agent_settings: Any):
        subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
                       shell=True, check=True)
        self.lab = Lab("rs" + secrets.token_hex(3))
        self.procs: dict[str, subprocess.Popen] = {}
        self.wrk_runs: list[str] = []
        self._wrk_stop = threading.Event()
        self._wrk_thread: threading.Thread | None = None
        self.lab.up(agent_settings={"l7_parsers": ["http"], **agent_settings})
        try:
            self._populate()
        except BaseException:
            self.down()
            raise

    # set-up ------------------------------------------------------------------------------
    def _populate(self) -> None:
        lab = self.lab
        for name, labels in (("client", {"app": "client"}), ("web1", {"app": "web"}),
                             ("web2", {"app": "web"}), ("l7srv", {"app": "l7srv"}),
                             ("intruder", {"app": "intruder"})):
            lab.add_pod(name, labels)
        lab.add_pod("server", {"app": "server"}, server="deathstar")
        lab.start_server("server", ["iperf3", "-s", "-p", "5201"], port=5201)
        for name, port in (("web1", 8080), ("web2", 8080), ("l7srv", 80)):
            lab.start_server(name, [sys.executable, str(HTTP_SERVER), "/dev/null", str(port)],
                             port=port)
        self.ip = {name: lab.pod(name)["ip"] for name in
                   ("client", "server", "web1", "web2", "l7srv", "intruder")}
        lab.client().put("/v1/service/default/rl-web", {
            "frontend": f"{VIP}:80/TCP",
            "backends": [f"{self.ip['web1']}:8080", f"{self.ip['web2']}:8080"]})
        for name, text in POLICIES.items():
            lab.client().post("/v1/policy", {"text": text, "name": name})
        self.wait_settled()

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Until every endpoint is regenerated and the L7 proxy reports healthy."""
        client = self.lab.client()
        deadline = time.monotonic() + timeout
        status: Any = None
        while time.monotonic() < deadline:
            status = client.get("/v1/endpoint-regeneration")
            l7 = [c for c in client.get("/v1/status")["capabilities"]
                  if c["kind"] == "l7" and c["name"] == "http"]
            if (not status["busy"] and not status["not_ready"] and l7
                    and l7[0]["state"] == "running" and l7[0]["status"].get("healthy")):
                return
            time.sleep(0.05)
        raise AssertionError(f"agent not settled after {timeout}s: {status}")

    # load --------------------------------------------------------------------------------
    def _spawn(self, name: str, pod: str, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(self.lab.exec_argv(pod, argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs[name] = proc
        return proc

    def start_load(self, seconds: float, iperf_rate: str = "200M") -> None:
        """Start every load; iperf3 runs `seconds` and must finish on its own."""
        ip = self.ip
        self.iperf_seconds, self.iperf_rate = int(seconds), iperf_rate
        self.iperf_runs: list[dict[str, Any]] = []
        self._start_iperf()
        for name, target, deny in (("service", [VIP, "80", "/ka-svc"], None),
                                   ("l7", [ip["l7srv"], "80", "/ka-l7"], "/nope")):
            proc = self._spawn(name, "client", [sys.executable, str(CLIENTS), "keepalive",
                                                *target, deny or "", "0.05"])
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"{name} keep-alive client failed: {proc.stderr.read()}")
            proc.local_port = json.loads(line)["local_port"]
        self.drops_before = self.policy_drops()  # before the first probe
        self._spawn("deny", "intruder", [sys.executable, str(CLIENTS), "deny",
                                         f"{ip['server']}:80", f"{ip['server']}:5201",
                                         f"{ip['l7srv']}:80", f"{ip['web1']}:8080"])
        self._wrk_thread = threading.Thread(target=self._wrk_loop, daemon=True)
        self._wrk_thread.start()
        time.sleep(1.5)  # iperf3's data connection is up, every loop has begun

    def _start_iperf(self) -> None:
        self._spawn("iperf3", "client", ["iperf3", "-c", self.ip["server"], "-p", "5201",
                                         "-t", str(self.iperf_seconds), "-b", self.iperf_rate,
                                         "-i", "1", "-J"])
        self.iperf_started = time.monotonic()

    def iperf_left(self) -> float:
        """Seconds the running iperf3 has left (0 when it is over)."""
        if self.procs["iperf3"].poll() is not None:
            return 0.0
        return self.iperf_seconds - (time.monotonic() - self.iperf_started)

    def next_iperf(self) -> None:
        """Let the running iperf3 finish (its result kept), start the next one (a restart
        must never straddle two runs: each restart happens inside one run)."""
        self._collect_iperf()
        self._start_iperf()
        time.sleep(1.0)  # its data connection is up

    def _collect_iperf(self) -> None:
        proc = self.procs["iperf3"]
        stdout, stderr = proc.communicate(timeout=self.iperf_seconds + 120)
        report = json.loads(stdout) if stdout.strip().startswith("{") else {}
        end = report.get("end", {})
        intervals = [i["sum"]["bytes"] for i in report.get("intervals", [])]
        self.iperf_runs.append({
            "rc": proc.returncode, "error": report.get("error") or stderr.strip(),
            "bytes": end.get("sum_received", {}).get("bytes", 0),
            "retransmits": end.get("sum_sent", {}).get("retransmits", 0),
            "intervals": len(intervals), "stalled_intervals": sum(1 for b in intervals if not b),
            "short": len(intervals) < self.iperf_seconds - 1})

    def _wrk_loop(self) -> None:
        url = f"http://{self.ip['server']}/v1"
        while not self._wrk_stop.is_set():
            got = subprocess.run(self.lab.exec_argv("client", [
                "wrk", "-t1", "-c2", "-d2s", "--timeout", "3s", url]),
                capture_output=True, text=True, timeout=60)
            self.wrk_runs.append(got.stdout + got.stderr)

    def policy_drops(self) -> int:
        return sum(r["packets"] for r in self.lab.client().get("/v1/bpf/metrics")
                   if r["reason"] == POLICY_DENIED)

    def long_lived_ports(self) -> dict[str, set[tuple[int, str]]]:
        """(client port, peer address) of the connections that must survive: iperf3's
        control and data connections (from `ss`), the service connection (to the VIP, and
        to the backend after translation) and the L7 keep-alive connection. A port alone
        is not enough: wrk's short connections reuse the same ports to other peers."""
        ip = self.ip
        out = self.lab.exec("client", ["ss", "-Htn", "state", "established"]).stdout
        iperf = {(int(cols[2].rpartition(":")[2]), ip["server"])
                 for cols in (line.split() for line in out.splitlines())
                 if len(cols) >= 4 and cols[3] == f"{ip['server']}:5201"}
        service = self.procs["service"].local_port
        return {"iperf3": iperf,
                "service": {(service, VIP), (service, ip["web1"]), (service, ip["web2"])},
                "l7": {(self.procs["l7"].local_port, ip["l7srv"])}}

    def finish(self) -> dict[str, Any]:
        """Wait for iperf3, stop the other loads; what each saw."""
        out: dict[str, Any] = {}
        self._collect_iperf()
        runs = self.iperf_runs
        out["iperf3"] = {"runs": len(runs), "rc": max(r["rc"] for r in runs),
                         "error": "; ".join(r["error"] for r in runs if r["error"]),
                         "bytes": sum(r["bytes"] for r in runs),
                         "retransmits": sum(r["retransmits"] for r in runs),
                         "intervals": sum(r["intervals"] for r in runs),
                         "stalled_intervals": sum(r["stalled_intervals"] for r in runs),
                         "short_runs": sum(r["short"] for r in runs)}
        self._wrk_stop.set()
        if self._wrk_thread is not None:
            self._wrk_thread.join(30)
        out["wrk"] = {"runs": len(self.wrk_runs),
                      "requests": sum(int(m.group(1)) for r in self.wrk_runs
                                      for m in [re.search(r"(\d+) requests in", r)] if m),
                      "failed_runs": [r for r in self.wrk_runs if "Socket errors" in r
                                      or "Non-2xx" in r or "requests in" not in r]}
        for name in ("service", "l7", "deny"):
            proc = self.procs[name]
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=30)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            out[name] = json.loads(lines[-1]) if lines else {"errors": [stderr.strip()]}
        out["policy_drops"] = self.policy_drops() - self.drops_before
        return out

    def start_watch(self) -> None:
        """Start the datapath watcher (tests/support/datapath_watch.py) in the node's netns
        on every endpoint: tc notifications and samples of programs and policy maps."""
        node = self.lab.node()
        endpoints = [f"{e['id']}:{e['ifindex']}" for e in self.lab.client().get("/v1/endpoint")]
        watch = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node['netns']}", sys.executable, str(WATCH),
             node["bpffs_root"], *endpoints], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.procs["watch"] = watch
        if watch.stdout.readline().strip() != "ready":
            raise AssertionError(f"datapath watcher failed: {watch.stderr.read()}")

    def stop_watch(self) -> dict[str, Any]:
        watch = self.procs["watch"]
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=30)
        return json.loads(out) if out.strip() else {"error": err}

    # agent -------------------------------------------------------------------------------
    def snapshot(self, ports: dict[str, set[tuple[int, str]]]) -> dict[str, Any]:
        """What a restart must adopt unchanged: endpoints (id, name, IP, veth, identity),
        every identity, and the conntrack entries of the long-lived connections."""
        client = self.lab.client()
        client_ip = self.ip["client"]
        wanted = set().union(*ports.values())
        ct = {}
        for e in client.get("/v1/bpf/ct"):
            if ((e["src"] == client_ip and (e["sport"], e["dst"]) in wanted)
                    or (e["dst"] == client_ip and (e["dport"], e["src"]) in wanted)):
                ct[(e["src"], e["sport"], e["dst"], e["dport"], e["protocol"],
                    e["direction"])] = (e["ep_id"], e["src_identity"], e["proxy_port"],
                                        e["rev_nat_index"], e["backend_id"])
        return {
            "endpoints": sorted((e["id"], e["name"], e["ipv4"], e["ifname"], e["ifindex"],
                                 e["identity"]) for e in client.get("/v1/endpoint")),
            "identities": sorted((i["id"], tuple(i["labels"]))
                                 for i in client.get("/v1/identity")),
            "ct": ct,
        }

    def restart(self, kind: str, settings: dict[str, Any] | None = None) -> dict[str, float]:
        """Stop the agent (`graceful`: SIGTERM and wait for its exit; `kill`: SIGKILL), then
        start it again (with `settings` merged into its config file: an upgrade) and wait
        until it settled. Returns the seconds each part took."""
        node = self.lab.node()
        pid = node["agent_pid"]
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM if kind == "graceful" else signal.SIGKILL)
        deadline = started + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {pid} still running 30 s after {kind} stop")
            time.sleep(0.02)
        stopped = time.monotonic()
        if settings:
            self.update_config(settings)
        self.lab.start_agent(self.lab.node())
        answered = time.monotonic()
        self.wait_settled()
        return {"stop_s": round(stopped - started, 2), "start_s": round(answered - stopped, 2),
                "settle_s": round(time.monotonic() - answered, 2)}

    def update_config(self, settings: dict[str, Any]) -> None:
        import yaml

        path = Path(self.lab.node()["state_dir"]) / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(settings)
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    def down(self) -> None:
        self._wrk_stop.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._wrk_thread is not None:
            self._wrk_thread.join(30)
        self.lab.down()


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Differences a restart must not make: endpoints and identities equal, every conntrack
    entry of a long-lived connection still there with the same endpoint, identity, proxy
    port and service translation."""
    problems = []
    for what in ("endpoints", "identities"):
        if before[what] != after[what]:
            problems.append(f"{what} changed: {before[what]} -> {after[what]}")
    for key, value in before["ct"].items():
        if after["ct"].get(key) != value:
            problems.append(f"conntrack {key}: {value} -> {after['ct'].get(key)}")
    return problems


def run_restarts(restarts: int, hold_s: float) -> dict[str, Any]:
    """`restarts` agent restarts under load, alternating graceful and `kill -9`, each held
    `hold_s` seconds with the agent up. Returns load results, timings and state problems."""
    rl = RestartLab()
    try:
        # a first restart without load: fills the compile cache, measures a cycle; iperf3
        # is sized to outlast every restart, and when a loaded machine makes them slower a
        # next iperf3 starts between two restarts (never during one)
        probe = rl.restart("graceful")
        slowest = sum(probe.values())
        cycle = hold_s + max(6.0, 2 * slowest)
        seconds = restarts * cycle + 5
        rl.start_load(seconds)
        ports = rl.long_lived_ports()
        timings, problems, ct_entries, straddled = [], [], 0, 0
        rl.start_watch()
        for i in range(restarts):
            if rl.iperf_left() < 2 * slowest + 10:
                rl.next_iperf()
                ports = rl.long_lived_ports()
            kind = "graceful" if i % 2 == 0 else "kill"
            run = len(rl.iperf_runs)
            before = rl.snapshot(ports)
            timings.append({"kind": kind, **rl.restart(kind)})
            slowest = max(slowest, sum(v for k, v in timings[-1].items() if k != "kind"))
            after = rl.snapshot(ports)
            straddled += rl.iperf_left() <= 0 or len(rl.iperf_runs) != run
            problems += [f"restart {i + 1} ({kind}): {p}" for p in compare(before, after)]
            ct_entries = max(ct_entries, len(before["ct"]))
            time.sleep(hold_s)
        watched = rl.stop_watch()
        result = rl.finish()
        agent_log = (Path(rl.lab.node()["state_dir"]) / "agent.log").read_text()
        result["extra_regenerations"] = agent_log.count("L7 proxy ports changed")
        result.update({"restarts": restarts, "watch": watched, "timings": timings,
                       "state_problems": problems,
                       "ports": {k: sorted(v) for k, v in ports.items()},
                       "ct_entries_watched": ct_entries,
                       "restarts_outside_iperf3": straddled, "seconds": round(seconds)})
        return result
    finally:
        rl.down()


PING_INTERVAL_S = 0.002


def _ping_argv(ip: str, seconds: float) -> list[str]:
    return ["ping", "-q", "-i", str(PING_INTERVAL_S), "-W", "1",
            "-c", str(int(seconds / PING_INTERVAL_S)), ip]


def _ping_result(out: str) -> dict[str, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if found is None:
        raise AssertionError(f"no ping summary in {out!r}")
    sent, received = int(found.group(1)), int(found.group(2))
    return {"sent": sent, "received": received, "lost": sent - received}


def run_upgrade(settings: dict[str, Any]) -> dict[str, Any]:
    """Restart the agent with `settings` changed (a define of the endpoint object changes,
    so a new object is compiled and loaded) while the restart-lab load runs, plus a ping
    every 2 ms server → client and a sampler of every endpoint's tc programs and policy
    map. The ping's loss in an equal window just before, with no upgrade, is the bound."""
    rl = RestartLab()
    try:
        probe = rl.restart("graceful")  # warm-up; measures how long a restart takes
        window = max(12.0, 3 * sum(probe.values()) + 5)
        seconds = 3 * window + 8  # two ping windows (2 ms pings run late under load)
        node = rl.lab.node()
        cache = Path(node["state_dir"]) / "bpf-cache"
        objects_before = sorted(p.name for p in cache.glob("bpf_lxc-*.o"))
        rl.start_load(seconds)
        ports = rl.long_lived_ports()
        pinger = ["server", _ping_argv(rl.ip["client"], window)]
        baseline = _ping_result(rl.lab.exec(*pinger, timeout=window * 4).stdout)
        if rl.iperf_left() < window + 2 * sum(probe.values()) + 10:
            rl.next_iperf()  # a loaded machine slowed the baseline: the swap needs one run
            ports = rl.long_lived_ports()
        before = rl.snapshot(ports)
        rl.start_watch()
        ping = subprocess.Popen(rl.lab.exec_argv(*pinger), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        rl.procs["ping"] = ping
        time.sleep(1)
        timing = rl.restart("graceful", settings=settings)
        ping_covered = ping.poll() is None
        iperf_running = rl.procs["iperf3"].poll() is None
        ping_out, _ = ping.communicate(timeout=window * 4)
        watched = rl.stop_watch()
        after = rl.snapshot(ports)
        result = rl.finish()
        result.update({
            "timing": timing, "window_s": window, "baseline_ping": baseline,
            "upgrade_ping": _ping_result(ping_out), "ping_covered_the_swap": ping_covered,
            "watch": watched,
            "state_problems": compare(before, after), "ct_entries_watched": len(before["ct"]),
            "objects_before": objects_before,
            "objects_after": sorted(p.name for p in cache.glob("bpf_lxc-*.o")),
            "iperf3_ran_throughout": iperf_running, "seconds": round(seconds)})
        return result
    finally:
        rl.down()


def main(argv: list[str]) -> int:
    """`python -m tests.support.restart_load restarts [N] [HOLD_S]` or `... upgrade`: one
    run, its result as JSON (the tests assert on the same; `make soak` runs the tests)."""
    if argv[:1] == ["restarts"]:
        got = run_restarts(int(argv[1]) if len(argv) > 1 else 20,
                           float(argv[2]) if len(argv) > 2 else 2.0)
    elif argv[:1] == ["upgrade"]:
        got = run_upgrade({"ct_timeout_syn": 59})
    else:
        print("usage: python -m tests.support.restart_load restarts [N] [HOLD_S] | upgrade",
              file=sys.stderr)
        return 2
    print(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
