"""Fixtures for the L7 proxy tests: the TPROXY topology, the HTTP server behind it, and an
"agent" (the real `l7_http` backend on an event loop thread) that feeds the proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pylium.api.context import L7Context
from pylium.api.node import NodeInfo
from pylium.policy.http import PortRuleHTTP
from pylium.policy.mapstate import Direction, PolicyKey
from pylium.policy.resolve import L7Grant

from .topology import (
    CLIENT_IP,
    EGRESS_DPORT,
    INGRESS_DPORT,
    REFUSED_DPORT,
    SERVER_IP,
    TproxyTopology,
)

HERE = Path(__file__).resolve().parent
CLIENT_ID, SERVER_ID = 2001, 1001
TCP = 6


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, TPROXY)")


class PolicySource:
    """`L7Context.policy` as the tests set it: a snapshot of real PolicyKey/L7Grant."""

    def __init__(self):
        self.entries_by_ip: dict[str, list] = {SERVER_IP: [], CLIENT_IP: []}
        self.callbacks = []

    def snapshot(self):
        ids = {SERVER_IP: (1, SERVER_ID), CLIENT_IP: (2, CLIENT_ID)}
        return [{"ep_id": ids[ip][0], "ipv4": ip, "identity": ids[ip][1], "entries": entries}
                for ip, entries in self.entries_by_ip.items()]

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, ingress=None, egress=None) -> None:
        """ingress/egress: {peer identity (0 = any): (L7Grant, ...)}, on the test ports."""
        self.entries_by_ip[SERVER_IP] = [
            (PolicyKey(peer, Direction.INGRESS, TCP, port, 16), grants)
            for peer, grants in (ingress or {}).items()
            for port in (INGRESS_DPORT, REFUSED_DPORT)]
        self.entries_by_ip[CLIENT_IP] = [
            (PolicyKey(peer, Direction.EGRESS, TCP, EGRESS_DPORT, 16), grants)
            for peer, grants in (egress or {}).items()]
        for callback in list(self.callbacks):
            callback()


class Flows:
    def __init__(self):
        self.items = []
        self.lock = threading.Lock()

    def record_l7(self, **fields):
        with self.lock:
            self.items.append(fields)

    def clear(self):
        with self.lock:
            self.items.clear()


class Agent:
    """The backend on its own event loop thread, as the agent runs it."""

    def __init__(self, topo: TproxyTopology, state_dir: Path):
        from prometheus_client import CollectorRegistry
        from pylium_l7_http.backend import L7Http

        self.policy = PolicySource()
        self.flows = Flows()
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        context = L7Context(
            name="http", node=NodeInfo("n1", "10.231.0.1", "10.231.0.0/16"),
            state_dir=state_dir, options={"launcher": ["nsenter",
                                                       f"--net=/run/netns/{topo.router}"]},
            proxy_ports={"ingress": 10080, "egress": 10081}, policy=self.policy,
            flows=self.flows, metrics=self.registry)
        self.backend = L7Http.from_context(context)

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def apply(self, ingress=None, egress=None) -> dict:
        """Set the policy (announced through `subscribe`, as the agent does) and wait until
        the proxy acknowledged exactly that snapshot."""
        from pylium.l7.supervisor import policy_message

        self.loop.call_soon_threadsafe(self.policy.set, ingress, egress)
        backend = self.backend
        for _ in range(250):
            threading.Event().wait(0.02)
            want = policy_message(self.policy.snapshot(), "http", (), 0)
            ack = backend.supervisor.last_ack
            if backend._last_sent == want and ack.get("revision") == backend._revision:
                return ack
        raise AssertionError("the proxy never acknowledged the policy")

    def metric(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def close(self) -> None:
        self.call(self.backend.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def http_rules(*rules: PortRuleHTTP, name: str = "test/l7[0]") -> tuple[L7Grant, ...]:
    return (L7Grant(name, "http", tuple(rules)),)


@pytest.fixture(scope="module")
def topo():
    need_root()
    t = TproxyTopology().up()
    try:
        yield t
    finally:
        t.down()


@pytest.fixture(scope="module")
def server(topo, tmp_path_factory):
    log = tmp_path_factory.mktemp("l7-proxy-server") / "requests.jsonl"
    log.touch()
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{topo.server}", sys.executable,
                             str(HERE / "http_server.py"), str(log), str(INGRESS_DPORT),
                             str(EGRESS_DPORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.log = log
    proc.seen = lambda: [json.loads(line) for line in log.read_text().splitlines()]
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def agent(topo, server, tmp_path_factory):
    from pylium.l7.proxy import stop_running

    state = tmp_path_factory.mktemp("l7-proxy-agent")
    a = Agent(topo, state)
    a.call(a.backend.start())
    try:
        yield a
    finally:
        a.close()
        stop_running(state / "proxy")
