"""kill -9 the agent while a stream runs through the L7 proxy: the redirect lives in the
kernel (programs, conntrack with the proxy port, policy routing), so the proxied stream goes
on without an agent, and the restarted agent keeps redirecting new connections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from ..endpoint.eplab import import_policy, make_lab
from .redirect_lab import INGRESS_PROXY, Listener, land, plugin_site, pods, redirect_entries

STREAM_SECONDS = 8

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rd-restart}
spec:
  endpointSelector: {matchLabels: {app: rdserver}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: rdclient}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "5201", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"


def test_proxied_stream_survives_agent_kill_and_restart():
    with plugin_site() as site:
        lab = make_lab(l7_parsers=["redirecttest"])
        stream = None
        try:
            lab.add_pod("rdclient", {"app": "rdclient"})
            lab.add_pod("rdserver", {"app": "rdserver"}, server="deathstar")
            p = pods(lab)
            client, server = p["rdclient"], p["rdserver"]
            lab.start_server("rdserver", ["iperf3", "-s", "-p", "5201"], port=5201)
            proxy = Listener(lab, INGRESS_PROXY, {client["ip"]: client["identity"]},
                             site / "listener.log")
            import_policy(lab, POLICY)
            assert len(redirect_entries(lab, server["endpoint_id"])) == 2

            stream = subprocess.Popen(
                lab.exec_argv("rdclient", ["iperf3", "-c", server["ip"], "-t",
                                           str(STREAM_SECONDS), "-i", "1", "-J"]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(2)
            agent_pid = lab.node()["agent_pid"]
            os.kill(agent_pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(agent_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(agent_pid)
            # no agent: new connections still go through the proxy
            assert land(lab, "rdclient", server["ip"]).stdout == "Ship landed\n"

            lab.start_agent(lab.node())
            assert len(redirect_entries(lab, server["endpoint_id"])) == 2
            assert land(lab, "rdclient", server["ip"]).stdout == "Ship landed\n"

            out, err = stream.communicate(timeout=STREAM_SECONDS + 20)
            assert stream.returncode == 0, err
            report = json.loads(out)
            per_second = [i["sum"]["bytes"] for i in report["intervals"]]
            assert len(per_second) >= STREAM_SECONDS - 1
            assert all(b > 0 for b in per_second), per_second  # never stalled
            # every connection (iperf3's control + data, the curls) went through the proxy
            seen = proxy.connections(wait_for=4)
            assert {tuple(c["sockname"]) for c in seen} == {(server["ip"], 5201),
                                                            (server["ip"], 80)}
            assert all(c["peername"][0] == client["ip"] for c in seen)
            gbps = report["end"]["sum_received"]["bytes"] * 8 / STREAM_SECONDS / 1e9
            print(f"iperf3 through the redirect + python relay: {gbps:.2f} Gbit/s")
        finally:
            if stream is not None and stream.poll() is None:
                stream.kill()
                stream.wait()
            lab.down()
