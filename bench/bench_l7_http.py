"""HTTP through pylium's L7 proxy against nginx as a reverse proxy, side by side on one path:
a client netns, a router netns (where the proxies run) and a server netns with nginx serving
`GET /x`. wrk (1 thread, keep-alive) at 1, 10 and 100 connections:

* direct  — client -> router (routed) -> server, no proxy (the ceiling);
* pylium  — the same packets TPROXY'd into pylium's proxy process (HTTP rule `GET /x`
  enforced, flows sent to a feeding "agent"), which opens the upstream with the client
  identity's SO_MARK;
* nginx   — client -> nginx on the router (1 worker, upstream keep-alive) -> server.

Goal (issue 11): pylium >= 0.5x nginx req/s and p99 <= 2x nginx's. Both proxies get one
worker/thread; the machine's 2 cores are shared with wrk and the server, so absolute numbers
are noisy — the ratios are what to compare."""

from __future__ import annotations

import asyncio
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

from common import report  # noqa: E402
from pylium.l7.supervisor import ProxySupervisor  # noqa: E402
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


def nginx_conf(prefix: Path, body: str) -> Path:
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
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


def wrk(topo: TproxyTopology, url: str, connections: int) -> dict[str, float]:
    out = topo.ns(topo.client, "wrk", "-t1", f"-c{connections}", f"-d{SECONDS}s",
                  "--latency", url, timeout=SECONDS + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale,
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": sockets.group(1) if sockets else ""}


def main() -> int:
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        print("needs nginx and wrk (apt-get install nginx wrk)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="l7-proxy-bench-"))
    topo = TproxyTopology("l7-bench").up()
    procs: list[subprocess.Popen] = []
    try:
        server_conf = nginx_conf(tmp / "server", f"""
  server {{ listen {INGRESS_DPORT}; listen {DIRECT_PORT};
           location /x {{ default_type text/plain; return 200 "ok\\n"; }} }}""")
        proxy_conf = nginx_conf(tmp / "proxy", f"""
  upstream backend {{ server {SERVER_IP}:{DIRECT_PORT}; keepalive 256; }}
  server {{ listen {ROUTER_CLIENT_IP}:{NGINX_PROXY_PORT};
           location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                         proxy_set_header Connection ""; }} }}""")
        for ns, conf in ((topo.server, server_conf), (topo.router, proxy_conf)):
            procs.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "nginx",
                                           "-c", str(conf)]))
        time.sleep(0.5)
        flows = [0]
        loop = asyncio.new_event_loop()
        supervisor = ProxySupervisor(
            tmp / "pylium", "pylium_l7_http.parser:HttpParserFactory",
            {"ingress": 10080, "egress": 10081}, "bench",
            on_flow=lambda _m: flows.__setitem__(0, flows[0] + 1),
            launcher=["nsenter", f"--net=/run/netns/{topo.router}"])
        loop.run_until_complete(supervisor.start())
        loop.run_until_complete(supervisor.push({
            "op": "policy", "revision": 1, "ipcache": [[f"{CLIENT_IP}/32", 2001]],
            "endpoints": [{"ep_id": 1, "ipv4": SERVER_IP, "identity": 1001, "entries": [{
                "identity": 0, "direction": "ingress", "protocol": 6, "port": INGRESS_DPORT,
                "port_prefix_len": 16, "grants": [{"rule": "bench", "kind": "http",
                                                   "allow_all": False,
                                                   "rules": [{"method": "GET",
                                                              "path": "/x"}]}]}]}]}))
        urls = {"direct": f"http://{SERVER_IP}:{DIRECT_PORT}/x",
                "pylium": f"http://{SERVER_IP}:{INGRESS_DPORT}/x",
                "nginx": f"http://{ROUTER_CLIENT_IP}:{NGINX_PROXY_PORT}/x"}
        for name, url in urls.items():  # warm up (connections, caches)
            wrk_result = topo.ns(topo.client, "curl", "-s", url).stdout
            assert wrk_result == "ok\n", (name, wrk_result)
        for connections in CONNECTIONS:
            got = {}
            for name, url in urls.items():
                # let the agent side drain the flows of the previous run
                loop.run_until_complete(asyncio.sleep(0.3))
                got[name] = wrk(topo, url, connections)
            extra = {"connections": connections, "direct_rps": got["direct"]["rps"],
                     "direct_p99_ms": got["direct"]["p99_ms"],
                     "pylium_errors": got["pylium"]["errors"],
                     "pylium_socket_errors": got["pylium"]["socket_errors"]}
            report("l7_http", f"req_per_s_c{connections}", "req/s", got["pylium"]["rps"],
                   got["nginx"]["rps"], "nginx 1 worker reverse proxy",
                   "pylium >= 0.5x nginx", **extra)
            report("l7_http", f"p99_c{connections}", "ms", got["pylium"]["p99_ms"],
                   got["nginx"]["p99_ms"], "nginx 1 worker reverse proxy",
                   "pylium <= 2x nginx", **extra)
        loop.run_until_complete(asyncio.sleep(0.5))
        print(f"# flows recorded by the feeding agent: {flows[0]}", file=sys.stderr)
        loop.run_until_complete(supervisor.shutdown())
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
