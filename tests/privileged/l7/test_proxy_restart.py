"""The proxy process outlives its agent: `kill -9` of the process feeding it cuts no
keep-alive connection, the last policy keeps being enforced, flows wait in a bounded buffer,
and the next agent adopts the same process (own topology: its proxy holds the ports)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

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
        if "/wrk" not in m["l7"]["http"].get("url", ""):
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


MESSAGE = {"op": "policy", "revision": 1, "endpoints": [{
    "ep_id": 1, "ipv4": SERVER_IP, "identity": SERVER_ID, "entries": [{
        "identity": 0, "direction": "ingress", "protocol": 6, "port": 80,
        "port_prefix_len": 16, "grants": [{"rule": "r", "kind": "http", "allow_all": False,
                                           "rules": [{"path": "/(ka|wrk).*"}]}]}]}],
    "ipcache": [[f"{CLIENT_IP}/32", CLIENT_ID]]}


class Agents:
    """Agent processes feeding one proxy state directory (each a real supervisor)."""

    def __init__(self, topo, state):
        self.topo, self.state = topo, state
        self.procs: list[subprocess.Popen] = []
        self.seen: list[str] = []

    def start(self):
        proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, str(self.state),
                                 self.topo.router, "10080"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        proc.stdin.write(json.dumps(MESSAGE) + "\n")
        proc.stdin.flush()
        while True:  # flows buffered while no agent listened come first
            line = proc.stdout.readline()
            assert line, "the agent exited"
            if line.startswith("ready"):
                _, how, pid = line.split()
                return proc, how, int(pid)
            self.seen.append(line)

    def close(self):
        from pylium.l7.proxy import stop_running

        for proc in self.procs:
            proc.kill()
            proc.wait()
        stop_running(self.state)
        assert not os.path.exists(self.state / "proxy.pid")


@pytest.fixture
def agents(topo, server, tmp_path):
    a = Agents(topo, tmp_path / "adopt")
    yield a
    a.close()


def test_proxy_survives_kill_9_of_its_agent_and_the_next_agent_adopts_it(topo, agents):
    first, how, pid = agents.start()
    assert how == "spawned"
    sock = topo.connect()
    try:
        reader = Reader(sock)
        sock.sendall(request("GET", "/ka1"))
        assert reader.response()[0] == 200
        first.kill()  # kill -9 of the agent
        first.wait()
        # the keep-alive connection goes on; the policy holds; flows wait for an agent
        for path, want in (("/ka2", 200), ("/nope", 403), ("/ka3", 200)):
            sock.sendall(request("GET", path))
            assert reader.response()[0] == want, path
        second, how2, pid2 = agents.start()
        assert (how2, pid2) == ("adopted", pid)
        sock.sendall(request("GET", "/ka4"))
        assert reader.response()[0] == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("/ka4" in s for s in agents.seen):
            agents.seen.append(second.stdout.readline())
        # buffered while no agent listened, then delivered to the adopter
        assert any("REQUEST http://deathstar/ka2" in s for s in agents.seen), agents.seen
        assert any("/nope" in s for s in agents.seen), agents.seen
    finally:
        sock.close()


def test_kill_9_of_the_agent_during_wrk_fails_no_request(topo, agents):
    first, how, pid = agents.start()
    wrk = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.client}", "wrk", "-t1",
                            "-c8", "-d4s", f"http://{SERVER_IP}/wrk"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    first.kill()
    first.wait()
    out, _ = wrk.communicate(timeout=30)
    print(out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    assert requests > 100, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    _, how2, pid2 = agents.start()
    assert (how2, pid2) == ("adopted", pid)
