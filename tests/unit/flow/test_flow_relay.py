"""`pylium observe --all-nodes`: one agent merges every registered agent's flows (two real
flow APIs on unix sockets sharing one embedded KV store file)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import types

import pytest
from aiohttp import web
from click.testing import CliRunner
from pylium.agent import routes_flow
from pylium.agent.server import errors_as_json
from pylium.cli.main import cli
from pylium.flow import relay
from pylium.flow.component import FlowObserver
from pylium.kvstore.embedded import EmbeddedKVStore

from .flow_starwars import starwars_events, starwars_resolver


class Agent:
    def __init__(self, node: str, tmp_path, kv_path):
        self.node = node
        self.socket = str(tmp_path / f"{node}.sock")
        self.observer = FlowObserver(node, starwars_resolver, capacity=1000)
        self.loop = asyncio.new_event_loop()
        self.kv = EmbeddedKVStore({"path": str(kv_path)}, tmp_path / node)
        self.daemon = types.SimpleNamespace(
            components={"flow": self.observer}, kvstore=self.kv,
            config=types.SimpleNamespace(node_name=node, socket=self.socket),
            spawn=lambda coro: self.loop.create_task(coro))
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application(middlewares=[errors_as_json])
        routes_flow.setup(app, self.daemon)
        self.runner = web.AppRunner(app)

        async def boot():
            await self.kv.open()
            await relay.register(self.daemon)
            await self.runner.setup()
            await web.UnixSite(self.runner, self.socket).start()

        self.loop.run_until_complete(boot())
        self.ready.set()
        self.loop.run_forever()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self):
        self.thread.start()
        assert self.ready.wait(20)

    def stop(self):
        async def down():
            await self.runner.cleanup()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await self.kv.close()

        self.call(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def agents(tmp_path):
    kv_path = tmp_path / "shared-kv.sqlite3"
    a, b = Agent("node-a", tmp_path, kv_path), Agent("node-b", tmp_path, kv_path)
    a.start()
    b.start()
    now = time.monotonic_ns()
    a.observer.ingest(b"".join(starwars_events(now)[:2]))       # tiefighter, on node-a
    b.observer.ingest(b"".join(starwars_events(now + 10)[2:]))  # xwing, on node-b
    # a third agent that registered and then died
    a.call(a.kv.put(relay.PEERS_PREFIX + "node-c", json.dumps(
        {"node_name": "node-c", "socket": str(tmp_path / "gone.sock")}).encode()))
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_all_nodes_merges_by_time_and_reports_unreachable_agents(agents):
    a, _b = agents
    result = CliRunner().invoke(cli, ["--socket", a.socket, "observe", "--all-nodes",
                                      "-o", "json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines()]
    flows = [x for x in lines if "flow" in x]
    assert [f["node_name"] for f in flows] == ["node-a", "node-a", "node-b", "node-b"]
    assert [f["flow"]["source"]["pod_name"] for f in flows] == ["tiefighter"] * 2 + ["xwing"] * 2
    down = [x["node_status"] for x in lines if "node_status" in x]
    assert down and down[0]["state_change"] == "NODE_UNAVAILABLE"
    assert down[0]["node_names"] == ["node-c"]
    # filters travel to every agent
    result = CliRunner().invoke(cli, ["--socket", a.socket, "observe", "--all-nodes",
                                      "--verdict", "DROPPED"])
    out = [x for x in result.output.splitlines() if "NODE_UNAVAILABLE" not in x]
    assert len(out) == 2 and all("default/xwing:43210" in x for x in out)
    # without --all-nodes only the asked agent's own flows
    local = CliRunner().invoke(cli, ["--socket", a.socket, "observe", "-o", "json"])
    assert {json.loads(x)["node_name"] for x in local.output.splitlines()} == {"node-a"}


def test_all_nodes_follow_sees_another_nodes_new_flows(agents):
    _a, b = agents
    a = agents[0]

    def feed():
        time.sleep(1.0)
        b.observer.ingest(b"".join(starwars_events()[3:]))

    t = threading.Thread(target=feed)
    t.start()
    result = CliRunner().invoke(cli, ["--socket", a.socket, "observe", "--all-nodes",
                                      "--follow", "--verdict", "DROPPED", "--timeout", "3",
                                      "-o", "json"])
    t.join()
    lines = [json.loads(x) for x in result.output.splitlines()]
    flows = [x for x in lines if "flow" in x]
    assert len(flows) == 1 and flows[0]["node_name"] == "node-b"
    assert flows[0]["flow"]["drop_reason_desc"] == "POLICY_DENIED"
