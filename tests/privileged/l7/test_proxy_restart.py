"""The proxy process outlives its agent: `kill -9` of the process feeding it cuts no
keep-alive connection, the last policy keeps being enforced, flows wait in a bounded buffer,
and the next agent adopts the same process (own topology: its proxy holds the ports)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .conftest import CLIENT_ID, SERVER_ID
from .test_http_proxy import Reader, request
from .topology import CLIENT_IP, SERVER_IP

AGENT_SCRIPT = r"""
import asyncio, json, sys
from pylium.l7.supervisor import ProxySupervisor, policy_message
state, router, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    flows = []
    def on_flow(m):
        flows.append(m)
        print("flow", m["l7"]["type"], m["l7"]["http"].get("url", ""), flush=True)
    sup = ProxySupervisor(state, "pylium_l7_http.parser:HttpParserFactory",
                          {"ingress": 10080, "egress": 10081}, "test-adopt",
                          on_flow=on_flow, launcher=["nsenter", f"--net=/run/netns/{router}"])
    how = await sup.start()
    message = json.loads(sys.stdin.readline())
    await sup.push(message)
    print("ready", how, sup.info["pid"], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_proxy_survives_kill_9_of_its_agent_and_the_next_agent_adopts_it(
        topo, server, tmp_path):
    import json

    from pylium.l7.proxy import stop_running

    state = tmp_path / "adopt"
    message = {"op": "policy", "revision": 1, "endpoints": [{
        "ep_id": 1, "ipv4": SERVER_IP, "identity": SERVER_ID, "entries": [{
            "identity": 0, "direction": "ingress", "protocol": 6, "port": 80,
            "port_prefix_len": 16, "grants": [{"rule": "r", "kind": "http",
                                               "allow_all": False,
                                               "rules": [{"path": "/ka.*"}]}]}]}],
        "ipcache": [[f"{CLIENT_IP}/32", CLIENT_ID]]}

    def start_agent():
        proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, str(state), topo.router,
                                 "10080"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        agents.append(proc)
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        while True:  # flows buffered while no agent listened come first
            line = proc.stdout.readline()
            assert line, "the agent exited"
            if line.startswith("ready"):
                _, how, pid = line.split()
                return proc, how, int(pid)
            seen.append(line)

    agents: list[subprocess.Popen] = []
    seen: list[str] = []

    first, how, pid = start_agent()
    try:
        assert how == "spawned"
        sock = topo.connect()
        reader = Reader(sock)
        sock.sendall(request("GET", "/ka1"))
        assert reader.response()[0] == 200
        first.kill()  # kill -9 of the agent
        first.wait()
        # the keep-alive connection goes on; the policy holds; flows wait for an agent
        for path, want in (("/ka2", 200), ("/nope", 403), ("/ka3", 200)):
            sock.sendall(request("GET", path))
            assert reader.response()[0] == want, path
        second, how2, pid2 = start_agent()
        try:
            assert (how2, pid2) == ("adopted", pid)
            sock.sendall(request("GET", "/ka4"))
            assert reader.response()[0] == 200
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("/ka4" in s for s in seen):
                seen.append(second.stdout.readline())
            # buffered while no agent listened, then delivered to the adopter
            assert any("REQUEST http://deathstar/ka2" in s for s in seen), seen
            assert any("/nope" in s for s in seen), seen
        finally:
            second.kill()
            second.wait()
        sock.close()
    finally:
        for proc in agents:
            proc.kill()
            proc.wait()
        stop_running(state)
        assert not os.path.exists(state / "proxy.pid")
