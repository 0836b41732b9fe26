"""HTTP through pylium's L7 proxy against nginx as a reverse proxy, side by side on one path:
a client netns, a router netns (where the proxies run) and a server netns with nginx serving
`GET /x` (one worker). wrk (1 thread, keep-alive) at 1, 10 and 100 connections:

* direct  — client -> router (routed) -> server, no proxy (the ceiling);
* pylium  — the same packets TPROXY'd into pylium's proxy process(es) (HTTP rule `GET /x`
  enforced, every request and response a flow record sent to a feeding "agent" that takes
  them while wrk runs), which opens the upstream with the client identity's SO_MARK;
* nginx   — client -> nginx on the router (upstream keep-alive) -> server;
* floor   — NOT a baseline: the least a proxy on issue 11's prescribed stack can do
  (`bench/l7_floor_proxy.py`: uvloop, asyncio Protocols, httptools parsing every request and
  response, one kept-alive upstream per client connection; no policy, no flows, no
  metrics), TPROXY'd on the same path as pylium with the same number of processes. Its
  `floor_*` fields on each result line tell how much of pylium's cost is the stack's and
  how much is pylium's own.
* ref     — with `--ref-tree DIR` (another pylium checkout, e.g. `git worktree add DIR main`):
  that tree's proxy, pool and policy as pylium's, on its own TPROXY'd port — a change's
  before and after in one interleaved run (`ref_*` fields).

Both proxies get the same number of processes (`--workers`, default 1: nginx
`worker_processes`, pylium's `ProxyPool` workers on SO_REUSEPORT). Each keeps its upstream
connections across requests (nginx: `keepalive` pool; pylium: one upstream per client
connection, kept while the client keeps it). The sides run interleaved, `--rounds` times each
with the order rotating, and the result lines compare medians (both spreads and the load
average attached): the machine's 2 cores are shared with wrk, the server and other work, so
absolute numbers are noisy — the ratios are what to compare. Each line also carries
`pylium_cpu_us_per_request` / `nginx_cpu_us_per_request` (medians): the CPU the proxy's own
processes spent per request, which that other load distorts least, and `flows_per_request`
(2: the agent got a record of every request and response), and `<side>_usr_sys_us`: that
CPU split into user and kernel time (medians). The feeding agent is this process running
the HTTP backend's own flow path for every record (`L7Http._batch` for a protocol 4 proxy,
`L7Http._flows` for whole records: proxy and Hubble metrics, then the flow ring), as a real
agent does; `agent_cpu_us_per_request_<side>` is
its CPU per request during that side's runs (during nginx's: what it costs idle), with the
agent's own garbage-collector settings (`pylium.gcpolicy`: with CPython's defaults the full
collections walking the flow ring cost more than the flows themselves).

The tail: `<side>_runq_ms_per_s` is how long that side's proxy processes waited for a CPU
(ms per second of a run, /proc/PID/schedstat; median and max of the runs),
`<side>_server_runq_ms_per_s` the same for the server's nginx, and `<side>_max_ms` wrk's
worst latency. A per-request log of a session's c100 runs found the p99 of a slow run made
of moments when all 100 requests in flight waited together at one process of the chain
(proxy, server or wrk) while it waited for a CPU: runs whose proxy waited 200-550 ms/s
had a p99 of 15-65 ms; of two whose proxy waited 20-25 ms/s, one had 3.3 ms and the
other 25 ms (its server waited 175 ms/s). Each run's figures go to stderr as it ends.

Goal (issue 11): pylium >= 0.5x nginx req/s and p99 <= 2x nginx's."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "privileged" / "l7"))
sys.path.insert(0, str(REPO / "bench"))

from common import report_rounds, spread  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from pylium import gcpolicy  # noqa: E402
from pylium.api.context import L7Context  # noqa: E402
from pylium.api.node import NodeInfo  # noqa: E402
from pylium.flow.component import FlowObserver  # noqa: E402
from pylium.l7.supervisor import ProxyPool  # noqa: E402
from pylium_l7_http.backend import L7Http  # noqa: E402
from topology import (  # noqa: E402
    CLIENT_IP,
    INGRESS_DPORT,
    ROUTER_CLIENT_IP,
    SERVER_IP,
    TproxyTopology,
)

CONNECTIONS = (1, 10, 100)
SECONDS = 3
DIRECT_PORT = 8000          # nginx on the server, not TPROXY'd
NGINX_PROXY_PORT = 8888     # nginx reverse proxy on the router
FLOOR_DPORT = 82            # TPROXY'd to the floor proxy on the router
FLOOR_PROXY = 10090
REF_DPORT = 83              # TPROXY'd to the --ref-tree proxy
REF_PROXY = 10082


def nginx_conf(prefix: Path, body: str, workers: int = 1) -> Path:
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  {body}
}}
""")
    return conf


def wrk(loop: asyncio.AbstractEventLoop, topo: TproxyTopology, url: str, connections: int,
        seconds: float) -> dict[str, float]:
    """One wrk run. The loop runs meanwhile, so the feeding agent takes the proxy's flow
    records while they are made (its CPU counts, as a real agent's would)."""
    async def run() -> str:
        proc = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/run/netns/{topo.client}", "wrk", "-t1", f"-c{connections}",
            f"-d{seconds}s", "--latency", url, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
        return out.decode()
    out = loop.run_until_complete(run())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def ms(pattern: str) -> float:
        value, unit = re.search(pattern + r"\s+([\d.]+)(us|ms|s)\b", out).groups()
        return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], 3)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "requests": requests, "p50_ms": ms(r"50%"), "p99_ms": ms(r"99%"),
            # wrk's "Latency  avg  stdev  max" line: the third figure
            "max_ms": ms(r"Latency\s+[\d.]+\w+\s+[\d.]+\w+"),
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": sockets.group(1) if sockets else ""}


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes so far (a process gone counts 0)."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def runqueue_wait(pids: list[int]) -> float:
    """Seconds these processes spent runnable but waiting for a CPU so far (the second
    figure of /proc/PID/schedstat; a process gone counts 0). The tail of a run on this
    shared machine follows it: every process of the chain (wrk, proxy, server) waiting
    for a CPU holds all requests in flight through it."""
    waited = 0
    for pid in pids:
        try:
            waited += int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return waited / 1e9


def bench_policy(port: int) -> dict:
    """The policy pushed to a pylium proxy: the client may `GET /x` on the server's `port`
    (an HTTP rule: every request is parsed and judged)."""
    return {"op": "policy", "revision": 1, "ipcache": [[f"{CLIENT_IP}/32", 2001]],
            "endpoints": [{"ep_id": 1, "ipv4": SERVER_IP, "identity": 1001, "entries": [{
                "identity": 0, "direction": "ingress", "protocol": 6, "port": port,
                "port_prefix_len": 16, "grants": [{"rule": "bench", "kind": "http",
                                                   "allow_all": False,
                                                   "rules": [{"method": "GET",
                                                              "path": "/x"}]}]}]}]}


def feeding_agent(counter: list[int]) -> dict:
    """`on_flow`/`on_flows` doing what the agent does with the records (the HTTP backend's
    `_flow`/`_flows`: proxy and Hubble HTTP metrics, then the flow layer's `record_l7` into a
    flow ring), and counting them."""
    backend = L7Http.from_context(L7Context(
        name="http", node=NodeInfo("bench", CLIENT_IP, "10.0.0.0/24"),
        metrics=CollectorRegistry(), flows=FlowObserver("bench")))
    record, record_many = backend._flow, backend._flows

    def on_flow(message: dict) -> None:
        record(message)
        counter[0] += 1

    def on_flows(messages: list) -> None:
        record_many(messages)
        counter[0] += len(messages)
    out = {"on_flow": on_flow, "on_flows": on_flows}
    if hasattr(backend, "_batch"):  # a protocol 4 proxy's batches, as the agent takes them
        def on_batch(batch) -> None:
            backend._batch(batch)
            counter[0] += len(batch.records)
        out["on_batch"] = on_batch
    return out


def own_cpu() -> float:
    """CPU seconds of this process (the feeding agent) so far."""
    user, system = cpu_split([os.getpid()])
    return user + system


def nginx_workers(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(c) for c in children] or [master]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side")
    parser.add_argument("--seconds", type=int, default=SECONDS, help="length of one wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    parser.add_argument("--workers", type=int, default=1,
                        help="processes of each proxy (nginx worker_processes, pylium workers)")
    parser.add_argument("--ref-tree", type=Path,
                        help="another pylium checkout whose proxy runs as side `ref`")
    parser.add_argument("--only", nargs="+",
                        choices=("direct", "pylium", "nginx", "floor", "ref"),
                        help="run only these sides (no result line without pylium and nginx)")
    args = parser.parse_args(argv)
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        print("needs nginx and wrk (apt-get install nginx wrk)", file=sys.stderr)
        return 1
    gcpolicy.tune()  # the feeding agent collects garbage as the agent does (`pylium agent`)
    tmp = Path(tempfile.mkdtemp(prefix="l7-proxy-bench-"))
    topo = TproxyTopology("l7-bench").up()
    # the floor proxy's own TPROXY rule, in the bench's router netns only
    topo.ns(topo.router, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "eth-c", "-p",
            "tcp", "--dport", str(FLOOR_DPORT), "-j", "TPROXY", "--on-port", str(FLOOR_PROXY),
            "--tproxy-mark", "0x1/0x1")
    if args.ref_tree:  # and the reference tree's proxy's
        topo.ns(topo.router, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "eth-c",
                "-p", "tcp", "--dport", str(REF_DPORT), "-j", "TPROXY", "--on-port",
                str(REF_PROXY), "--tproxy-mark", "0x1/0x1")
    procs: list[subprocess.Popen] = []
    try:
        server_conf = nginx_conf(tmp / "server", f"""
  server {{ listen {INGRESS_DPORT}; listen {DIRECT_PORT}; listen {FLOOR_DPORT};
           listen {REF_DPORT};
           location /x {{ default_type text/plain; return 200 "ok\\n"; }} }}""")
        proxy_conf = nginx_conf(tmp / "proxy", f"""
  upstream backend {{ server {SERVER_IP}:{DIRECT_PORT}; keepalive 256; }}
  server {{ listen {ROUTER_CLIENT_IP}:{NGINX_PROXY_PORT};
           location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                         proxy_set_header Connection ""; }} }}""", args.workers)
        for ns, conf in ((topo.server, server_conf), (topo.router, proxy_conf)):
            procs.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "nginx",
                                           "-c", str(conf)]))
        floor = [subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.router}", sys.executable,
                                   str(REPO / "bench" / "l7_floor_proxy.py"), "--port",
                                   str(FLOOR_PROXY)], stdout=subprocess.PIPE)
                 for _ in range(args.workers)]
        procs.extend(floor)
        for proc in floor:
            assert proc.stdout.readline() == b"ready\n", "the floor proxy did not start"
        time.sleep(0.5)
        flows = [0]
        loop = asyncio.new_event_loop()
        supervisor = ProxyPool(
            tmp / "pylium", "pylium_l7_http.parser:HttpParserFactory",
            {"ingress": 10080, "egress": 10081}, "bench", workers=args.workers,
            **feeding_agent(flows),
            launcher=["nsenter", f"--net=/run/netns/{topo.router}"])
        loop.run_until_complete(supervisor.start())
        loop.run_until_complete(supervisor.push(bench_policy(INGRESS_DPORT)))
        ref_pool, ref_flows = None, [0]
        if args.ref_tree:  # the reference tree's modules first on its proxies' path
            ref = args.ref_tree.resolve()
            ref_agent = feeding_agent(ref_flows)
            ref_pool = ProxyPool(
                tmp / "pylium-ref", "pylium_l7_http.parser:HttpParserFactory",
                {"ingress": REF_PROXY, "egress": REF_PROXY + 1}, "bench-ref",
                workers=args.workers,
                # this agent's own path: a protocol 4 proxy's batches to `on_batch`,
                # an older tree's (protocol 2, 3) records whole to `on_flows`
                **ref_agent,
                launcher=["nsenter", f"--net=/run/netns/{topo.router}", "env",
                          f"PYTHONPATH={ref / 'core'}:{ref / 'plugins' / 'l7_http'}"])
            loop.run_until_complete(ref_pool.start())
            loop.run_until_complete(ref_pool.push(bench_policy(REF_DPORT)))
        gcpolicy.settle()  # as the agent after its start-up
        urls = {"direct": f"http://{SERVER_IP}:{DIRECT_PORT}/x",
                "pylium": f"http://{SERVER_IP}:{INGRESS_DPORT}/x",
                "nginx": f"http://{ROUTER_CLIENT_IP}:{NGINX_PROXY_PORT}/x",
                "floor": f"http://{SERVER_IP}:{FLOOR_DPORT}/x"}
        if ref_pool is not None:
            urls["ref"] = f"http://{SERVER_IP}:{REF_DPORT}/x"
        # the proxies' own processes: CPU per request is the comparison the machine's other
        # load distorts least (nginx's master only supervises)
        proxy_pids = {"pylium": [m.info["pid"] for m in supervisor.members],
                      "nginx": nginx_workers(procs[1].pid), "direct": [],
                      "floor": [p.pid for p in floor],
                      "ref": [m.info["pid"] for m in ref_pool.members] if ref_pool else []}
        server_pids = nginx_workers(procs[0].pid)
        for name, url in urls.items():  # warm up (connections, caches)
            got = topo.ns(topo.client, "curl", "-s", url).stdout
            assert got == "ok\n", (name, got)
        names = [n for n in urls if n in args.only] if args.only else list(urls)
        for connections in args.connections:
            runs: dict[str, list[dict]] = {name: [] for name in names}
            load_before = os.getloadavg()[0]
            flows_before = flows[0]
            for round_ in range(args.rounds):
                # interleaved, the order rotating each round: drift on the shared machine
                # hits every side alike
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                for name in order:
                    # let the agent side drain the flows of the previous run
                    loop.run_until_complete(asyncio.sleep(0.3))
                    user, system = cpu_split(proxy_pids[name])
                    waited = runqueue_wait(proxy_pids[name])
                    server_waited = runqueue_wait(server_pids)
                    agent = own_cpu()
                    result = wrk(loop, topo, urls[name], connections, args.seconds)
                    # ms per second of the run the proxy waited for a CPU
                    result["runq_ms_per_s"] = (runqueue_wait(proxy_pids[name]) - waited) \
                        * 1e3 / args.seconds
                    result["server_runq_ms_per_s"] = (runqueue_wait(server_pids)
                                                      - server_waited) * 1e3 / args.seconds
                    # the flows of the run's last moments (a flush delay, the agent's turn)
                    loop.run_until_complete(asyncio.sleep(0.1))
                    agent = own_cpu() - agent
                    user_after, system_after = cpu_split(proxy_pids[name])
                    per = 1e6 / max(1, result["requests"])
                    result["agent_us"] = agent * per
                    result["usr_us"] = (user_after - user) * per
                    result["sys_us"] = (system_after - system) * per
                    result["cpu_us_per_request"] = result["usr_us"] + result["sys_us"]
                    runs[name].append(result)
                    print(f"# c={connections} {name} round {round_}: {result['rps']:.0f} req/s,"
                          f" p50 {result['p50_ms']} p99 {result['p99_ms']} max "
                          f"{result['max_ms']} ms, proxy CPU {result['cpu_us_per_request']:.2f}"
                          f" us/request (user {result['usr_us']:.2f}), waited for a CPU "
                          f"{result['runq_ms_per_s']:.0f} ms/s (the server "
                          f"{result['server_runq_ms_per_s']:.0f}), load "
                          f"{os.getloadavg()[0]:.2f}", file=sys.stderr)
            if "pylium" not in runs or "nginx" not in runs:
                for name, samples in runs.items():
                    usr_sys = [round(spread([r[part] for r in samples])["median"], 2)
                               for part in ("usr_us", "sys_us")]
                    print(f"# c={connections} {name}: rps "
                          f"{spread([r['rps'] for r in samples])} p99_ms "
                          f"{spread([r['p99_ms'] for r in samples])} cpu_us_per_request "
                          f"{spread([r['cpu_us_per_request'] for r in samples])} "
                          f"usr_sys_us {usr_sys} agent_cpu_us_per_request "
                          f"{spread([r['agent_us'] for r in samples])['median']:.2f}",
                          file=sys.stderr)
                continue
            loop.run_until_complete(asyncio.sleep(1.0))
            extra = {"connections": connections, "workers": args.workers,
                     # every request and response a flow: the agent got them all
                     "flows_per_request": round((flows[0] - flows_before) / max(
                         1, sum(r["requests"] for r in runs["pylium"])), 3),
                     "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                     "pylium_errors": sum(r["errors"] for r in runs["pylium"]),
                     "pylium_socket_errors": [r["socket_errors"] for r in runs["pylium"]
                                              if r["socket_errors"]]}
            for name in ("pylium", "nginx"):
                extra[f"{name}_cpu_us_per_request"] = spread(
                    [r["cpu_us_per_request"] for r in runs[name]])["median"]
                # how noisy the runs were for this side: its proxy's and the server's
                # wait for a CPU and the worst latency wrk saw (median, max of the runs)
                for field in ("runq_ms_per_s", "server_runq_ms_per_s", "max_ms"):
                    values = spread([r[field] for r in runs[name]])
                    extra[f"{name}_{field}"] = [round(values["median"], 1),
                                                round(values["max"], 1)]
            for name in runs:  # the feeding agent's CPU (this process) during each side's runs
                extra[f"agent_cpu_us_per_request_{name}"] = round(spread(
                    [r["agent_us"] for r in runs[name]])["median"], 2)
            if "direct" in runs:
                extra["direct_rps"] = spread([r["rps"] for r in runs["direct"]])["median"]
                extra["direct_p99_ms"] = spread([r["p99_ms"] for r in runs["direct"]])["median"]
            if "floor" in runs:  # the stack's floor, not a baseline (see the docstring)
                floor_rps = spread([r["rps"] for r in runs["floor"]])["median"]
                floor_p99 = spread([r["p99_ms"] for r in runs["floor"]])["median"]
                nginx_rps = spread([r["rps"] for r in runs["nginx"]])["median"]
                nginx_p99 = spread([r["p99_ms"] for r in runs["nginx"]])["median"]
                extra.update({
                    "floor_rps": floor_rps, "floor_rps_vs_nginx": round(floor_rps / nginx_rps, 4),
                    "floor_p99_ms": floor_p99,
                    "floor_p99_vs_nginx": round(floor_p99 / nginx_p99, 4) if nginx_p99 else None,
                    "floor_cpu_us_per_request": spread(
                        [r["cpu_us_per_request"] for r in runs["floor"]])["median"],
                    "floor_errors": sum(r["errors"] for r in runs["floor"])})
            if "ref" in runs:  # another tree's proxy: before/after of a change
                ref_rps = spread([r["rps"] for r in runs["ref"]])["median"]
                extra.update({
                    "ref_tree": str(args.ref_tree), "ref_rps": ref_rps,
                    "ref_rps_vs_nginx": round(ref_rps / spread(
                        [r["rps"] for r in runs["nginx"]])["median"], 4),
                    "ref_p99_ms": spread([r["p99_ms"] for r in runs["ref"]])["median"],
                    "ref_cpu_us_per_request": spread(
                        [r["cpu_us_per_request"] for r in runs["ref"]])["median"],
                    "ref_errors": sum(r["errors"] for r in runs["ref"])})
            for name in runs:
                if name != "direct":
                    extra[f"{name}_usr_sys_us"] = [
                        round(spread([r[part] for r in runs[name]])["median"], 2)
                        for part in ("usr_us", "sys_us")]
            baseline = f"nginx reverse proxy, {args.workers} worker(s), upstream keep-alive"
            report_rounds("l7_http", f"req_per_s_c{connections}", "req/s",
                          [r["rps"] for r in runs["pylium"]], [r["rps"] for r in runs["nginx"]],
                          baseline, "pylium >= 0.5x nginx", lambda a, b: a >= 0.5 * b, **extra)
            report_rounds("l7_http", f"p99_c{connections}", "ms",
                          [r["p99_ms"] for r in runs["pylium"]],
                          [r["p99_ms"] for r in runs["nginx"]],
                          baseline, "pylium <= 2x nginx", lambda a, b: a <= 2 * b, **extra)
        loop.run_until_complete(asyncio.sleep(0.5))
        print(f"# flows recorded by the feeding agent: {flows[0]}", file=sys.stderr)
        loop.run_until_complete(supervisor.refresh())
        for member in supervisor.members:  # SO_REUSEPORT spread the load over the workers
            stats = member.info.get("stats", {})
            print(f"# pylium worker pid {member.info.get('pid')}: "
                  f"{stats.get('connections', 0)} connections, {stats.get('requests', 0)} "
                  f"requests, {stats.get('flows_lost', 0)} flows lost, "
                  f"{member.info.get('buffered_flows')} buffered, "
                  f"{member.unknown_conns} naming no known connection", file=sys.stderr)
        loop.run_until_complete(supervisor.shutdown())
        if ref_pool is not None:
            loop.run_until_complete(ref_pool.shutdown())
        loop.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        topo.down()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
