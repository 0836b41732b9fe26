"""Several proxy processes on the same ports (`ProxyPool`, SO_REUSEPORT): TPROXY spreads the
connections over them, each enforces the pushed policy, a dead worker is respawned (the ports
count as unserved meanwhile: fail closed), `kill -9` of the agent during wrk fails no
request and the next agent adopts every worker, and a pool of another size replaces them
(own topology: the pool holds the ports)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .test_http_proxy import Reader, request
from .test_proxy_restart import MESSAGE
from .topology import SERVER_IP

AGENT_SCRIPT = r"""
import asyncio, json, sys
from pylium.l7.supervisor import ProxyPool
state, router, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    pool = ProxyPool(state, "pylium_l7_http.parser:HttpParserFactory",
                     {"ingress": 10080, "egress": 10081}, "test-pool", workers=workers,
                     on_flow=lambda m: None,
                     launcher=["nsenter", f"--net=/run/netns/{router}"])
    how = await pool.start()
    assert await pool.push(json.loads(sys.stdin.readline())) is not None
    print("ready", how, ",".join(str(p) for p in pool.info["pids"]), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "status":  # else "peek": what the pool knows now
            await pool.refresh()
        print(json.dumps({"status": pool.status(), "served": sorted(pool.served_ports())}),
              flush=True)
asyncio.run(main())
"""


class PoolAgent:
    """One agent process running a `ProxyPool` (killed with -9 like a real agent)."""

    def __init__(self, topo, state, workers: int):
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, str(state),
                                      topo.router, str(workers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(MESSAGE) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"the pool agent said {line!r}"
        _, self.how, pids = line.split()
        self.pids = [int(p) for p in pids.split(",")]

    def status(self, refresh: bool = True) -> dict:
        self.proc.stdin.write("status\n" if refresh else "peek\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def state(topo, server, tmp_path):
    from pylium.l7.proxy import running_pid, stop_running

    path = tmp_path / "pool"
    agents: list[PoolAgent] = []
    yield path, agents
    for agent in agents:
        agent.kill()
    for sub in [path, *path.glob("worker-*")]:
        stop_running(sub)
        assert running_pid(sub) is None


def start(topo, state, workers: int) -> PoolAgent:
    path, agents = state
    agent = PoolAgent(topo, path, workers)
    agents.append(agent)
    return agent


def test_connections_spread_over_the_workers_and_each_enforces_the_policy(topo, state):
    agent = start(topo, state, 2)
    assert agent.how == "spawned" and len(set(agent.pids)) == 2
    for i in range(40):  # new connections: the reuseport group picks a worker by hash
        sock = topo.connect()
        try:
            reader = Reader(sock)
            sock.sendall(request("GET", f"/ka{i}"))
            assert reader.response()[0] == 200
            sock.sendall(request("GET", "/nope"))
            assert reader.response()[0] == 403
        finally:
            sock.close()
    workers = agent.status()["status"]["workers"]
    per_worker = [w["stats"].get("requests", 0) for w in workers]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == 80, per_worker
    assert [w["stats"].get("denied", 0) for w in workers] == \
        [n // 2 for n in per_worker]  # every worker judged by the same policy


def test_a_dead_worker_is_respawned_and_unserved_meanwhile(topo, state):
    agent = start(topo, state, 2)
    assert agent.status()["served"] == [10080, 10081]
    os.kill(agent.pids[1], signal.SIGKILL)
    saw_unserved = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = agent.status(refresh=False)
        pids = got["status"]["pid"]
        if got["served"] == []:
            saw_unserved = True
        elif saw_unserved and None not in pids and agent.pids[1] not in pids:
            break
        time.sleep(0.2)
    assert saw_unserved, "a pool with a dead worker still reported its ports served"
    assert got["served"] == [10080, 10081] and agent.pids[0] in pids, got
    for i in range(20):  # the respawned worker got the policy again
        sock = topo.connect()
        try:
            reader = Reader(sock)
            sock.sendall(request("GET", "/nope"))
            assert reader.response()[0] == 403
            sock.sendall(request("GET", f"/ka{i}"))
            assert reader.response()[0] == 200
        finally:
            sock.close()


def test_kill_9_of_the_agent_during_wrk_fails_no_request_and_all_are_adopted(topo, state):
    first = start(topo, state, 2)
    wrk = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.client}", "wrk", "-t1",
                            "-c8", "-d4s", f"http://{SERVER_IP}/wrk"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    first.kill()
    out, _ = wrk.communicate(timeout=30)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    assert requests > 100, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    second = start(topo, state, 2)
    assert (second.how, second.pids) == ("adopted", first.pids)


def test_a_pool_of_another_size_replaces_the_workers(topo, state):
    from pylium.l7.proxy import running_pid

    path, _ = state
    two = start(topo, state, 2)
    two.kill()
    one = start(topo, state, 1)  # the old workers would keep a share of the connections
    assert one.how == "spawned" and not set(one.pids) & set(two.pids)
    assert [running_pid(path / f"worker-{i}") for i in range(2)] == [None, None]
    for i in range(10):
        sock = topo.connect()
        try:
            reader = Reader(sock)
            sock.sendall(request("GET", f"/ka{i}"))
            assert reader.response()[0] == 200
        finally:
            sock.close()
    assert one.status()["status"]["stats"]["requests"] == 10
