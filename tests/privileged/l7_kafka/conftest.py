"""Fixtures for the Kafka proxy tests. No Kafka broker can run here: the broker is
librdkafka's mock cluster (inside confluent-kafka) on a real TCP port, in a network
namespace of the test's own; an iptables TPROXY rule in that namespace only sends client
connections to the broker's port to pylium's proxy (what the datapath's redirect does),
and the proxy's upstream (marked with the client's identity) goes to the broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from pylium.api.context import L7Context
from pylium.api.node import NodeInfo
from pylium.policy.kafka import PortRuleKafka
from pylium.policy.mapstate import Direction, PolicyKey
from pylium.policy.resolve import L7Grant

HERE = Path(__file__).resolve().parent
CLIENTS = HERE / "kafka_clients.py"
BROKER_IP = "127.0.0.1"
BROKER_ID = 1001
PROXY_PORT = 10092
TCP = 6


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


class KafkaNetns:
    """One namespace: the mock broker, the clients and the proxy, TPROXY on lo."""

    def __init__(self):
        self.name = f"l7-kafka-{uuid.uuid4().hex[:6]}"
        self.mock: subprocess.Popen | None = None
        self.bootstrap = ""
        self.port = 0

    def run(self, *args: str, check: bool = True, timeout: float = 60):
        return sh("nsenter", f"--net=/run/netns/{self.name}", *args, check=check,
                  timeout=timeout)

    def up(self) -> KafkaNetns:
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")
        self.mock = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.name}", sys.executable, str(CLIENTS), "mock",
             "3600"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.bootstrap = self.mock.stdout.readline().strip()
        self.port = int(self.bootstrap.rsplit(":", 1)[1])
        self.run("ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
        self.run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        self.tproxy(True)
        return self

    def tproxy(self, on: bool) -> None:
        """Send new client connections to the broker through the proxy (or not)."""
        # only unmarked packets: the proxy's upstream carries the client's identity mark
        self.run("iptables", "-t", "mangle", "-A" if on else "-D", "PREROUTING", "-i", "lo",
                 "-p", "tcp", "--dport", str(self.port), "-m", "mark", "--mark", "0", "-j",
                 "TPROXY", "--on-port", str(PROXY_PORT), "--tproxy-mark", "0x1/0x1")

    def down(self) -> None:
        if self.mock is not None:
            self.mock.kill()
            self.mock.wait()
        sh("ip", "netns", "del", self.name, check=False)

    def client(self, *args: str, timeout: float = 90) -> list[dict]:
        out = self.run(sys.executable, str(CLIENTS), *args, timeout=timeout, check=False)
        assert out.returncode == 0, f"client {args[0]} failed: {out.stderr[-2000:]}"
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def kcat(self, *args: str, stdin: str = "", timeout: float = 30):
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.name}", "kcat",
                               "-b", self.bootstrap, *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout)


class PolicySource:
    """`L7Context.policy` for the broker endpoint (127.0.0.1, identity 1001)."""

    def __init__(self, port: int):
        self.port = port
        self.entries: list = []
        self.callbacks = []

    def snapshot(self):
        return [{"ep_id": 1, "ipv4": BROKER_IP, "identity": BROKER_ID,
                 "entries": self.entries}]

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, grants: tuple[L7Grant, ...]) -> None:
        self.entries = [(PolicyKey(0, Direction.INGRESS, TCP, self.port, 16), grants)]
        for callback in list(self.callbacks):
            callback()


class Flows:
    def __init__(self):
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def record_l7(self, **fields):
        with self.lock:
            self.items.append(fields)

    def kafka(self) -> list[dict]:
        with self.lock:
            return [f for f in self.items if "kafka" in f.get("l7", {})]

    def clear(self):
        with self.lock:
            self.items.clear()


class Agent:
    """The `kafka` backend on its own event loop thread, as the agent runs it."""

    def __init__(self, netns: KafkaNetns, state_dir: Path):
        from prometheus_client import CollectorRegistry
        from pylium_l7_kafka.backend import L7Kafka

        self.policy = PolicySource(netns.port)
        self.flows = Flows()
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        context = L7Context(
            name="kafka", node=NodeInfo("n1", "10.232.0.1", "10.232.0.0/16"),
            state_dir=state_dir,
            options={"launcher": ["nsenter", f"--net=/run/netns/{netns.name}"]},
            proxy_ports={"ingress": PROXY_PORT}, policy=self.policy, flows=self.flows,
            metrics=self.registry)
        self.backend = L7Kafka.from_context(context)

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def apply(self, *rules: PortRuleKafka, name: str = "test/kafka[0]") -> dict:
        """Set the rules and push them now (even if unchanged); the proxy's ack."""
        grants = (L7Grant(name, "kafka", tuple(rules)),)

        async def push():
            self.policy.set(grants)
            return await self.backend.push_policy(force=True)

        ack = self.call(push())
        assert ack is not None and not ack.get("problems"), ack
        return ack

    def metric(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def close(self) -> None:
        self.call(self.backend.stop(), timeout=120)  # the machine may be loaded
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def kafka_netns():
    if os.geteuid() != 0:
        pytest.skip("needs root (netns, TPROXY)")
    netns = KafkaNetns()
    try:
        yield netns.up()
    finally:
        netns.down()


@pytest.fixture(scope="module")
def agent(kafka_netns, tmp_path_factory):
    from pylium.l7.proxy import stop_running

    state = tmp_path_factory.mktemp("l7-kafka-agent")
    a = Agent(kafka_netns, state)
    a.call(a.backend.start())
    try:
        yield a
    finally:
        a.close()
        stop_running(state / "proxy")
