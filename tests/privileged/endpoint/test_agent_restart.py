"""kill -9 the agent in the middle of a TCP stream: the stream lives on, policy keeps being
enforced while no agent runs (programs and maps are pinned/attached in the kernel), and the
restarted agent adopts the endpoints (same ids, IPs and veths) instead of rebuilding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from pylium.datapath import netns as plumbing

from .eplab import api, import_policy, make_lab, serve_ports, tcp

STREAM_SECONDS = 8

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: only-client
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "5201", protocol: TCP}, {port: "80", protocol: TCP}]}]
"""


def _endpoints(lab) -> list[tuple]:
    return [(e["id"], e["name"], e["ipv4"], e["ifname"], e["ifindex"], e["identity"])
            for e in api(lab).get("/v1/endpoint")]


def _host_links(lab) -> dict[str, int]:
    return {link.ifname: link.ifindex for link in plumbing.list_links(lab.node()["netns"])
            if link.ifname.startswith("lxc")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"


def test_agent_restart_keeps_streams_policy_and_endpoints():
    lab = make_lab()
    stream = None
    try:
        for name in ("client", "server", "intruder"):
            lab.add_pod(name, {"app": name})
        server_ip = lab.pod("server")["ip"]
        serve_ports(lab, "server", 80)
        lab.start_server("server", ["iperf3", "-s", "-p", "5201"], port=5201)
        import_policy(lab, POLICY)
        assert tcp(lab, "client", server_ip, 80) and not tcp(lab, "intruder", server_ip, 80)
        endpoints, links = _endpoints(lab), _host_links(lab)

        stream = subprocess.Popen(
            lab.exec_argv("client", ["iperf3", "-c", server_ip, "-t", str(STREAM_SECONDS),
                                     "-i", "1", "-J"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        agent_pid = lab.node()["agent_pid"]
        os.kill(agent_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(agent_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(agent_pid)

        # no agent: the kernel keeps enforcing the same policy
        assert not tcp(lab, "intruder", server_ip, 80)
        assert tcp(lab, "client", server_ip, 80)

        lab.start_agent(lab.node())
        assert lab.node()["agent_pid"] != agent_pid
        assert _endpoints(lab) == endpoints  # same ids, IPs, veths, identities
        assert _host_links(lab) == links  # no veth recreated
        log = open(f"{lab.node()['state_dir']}/agent.log").read()
        assert "adopted [1, 2, 3]" in log
        assert all(e["state"] == "ready" and e["ingress_enforced"]
                   for e in api(lab).get("/v1/endpoint") if e["name"] == "server")
        assert not tcp(lab, "intruder", server_ip, 80)
        assert tcp(lab, "client", server_ip, 80)

        out, err = stream.communicate(timeout=STREAM_SECONDS + 20)
        assert stream.returncode == 0, err
        report = json.loads(out)
        per_second = [i["sum"]["bytes"] for i in report["intervals"]]
        assert len(per_second) >= STREAM_SECONDS - 1
        assert all(b > 0 for b in per_second), per_second  # never stalled, not even once
        assert report["end"]["sum_received"]["bytes"] > 0
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        lab.down()
