"""`pylium observe` against the agent's real flow routes on a unix socket."""

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
from pylium.flow.component import FlowObserver

from .flow_starwars import starwars_events, starwars_resolver


class AgentThread:
    """The flow routes served on a unix socket from their own event loop."""

    def __init__(self, observer, path):
        self.daemon = types.SimpleNamespace(components={"flow": observer})
        self.path = str(path)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application(middlewares=[errors_as_json])  # as the agent's server
        routes_flow.setup(app, self.daemon)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.UnixSite(self.runner, self.path).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def agent(tmp_path):
    observer = FlowObserver("node-a", starwars_resolver, capacity=1000)
    observer.ingest(b"".join(starwars_events()))
    with AgentThread(observer, tmp_path / "pylium.sock") as a:
        a.observer = observer
        yield a


def observe(agent, *args):
    result = CliRunner().invoke(cli, ["--socket", agent.path, "observe", *args])
    return result


def test_observe_json_dropped_is_hubble_shaped(agent):
    result = observe(agent, "--verdict", "DROPPED", "-o", "json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines()]
    assert len(lines) == 2
    flow = lines[1]["flow"]
    assert flow["verdict"] == "DROPPED" and flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["source"]["pod_name"] == "xwing"
    assert "k8s:org=alliance" in flow["source"]["labels"]
    assert "k8s:org=empire" in flow["destination"]["labels"]
    assert flow["l4"]["TCP"]["destination_port"] == 80
    assert lines[1]["node_name"] == "node-a"


def test_observe_compact_and_table(agent):
    result = observe(agent, "--pod", "default/tiefighter")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert len(out) == 2 and all("default/tiefighter:40000 (ID:1002) -> " in x for x in out)
    assert out[1].endswith("to-endpoint FORWARDED (TCP Flags: SYN)")
    result = observe(agent, "-o", "table", "--from-label", "org=alliance")
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert rows[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(rows) == 3 and all("DROPPED" in r for r in rows[1:])


def test_observe_bad_filter_is_one_line_error(agent):
    result = observe(agent, "--since", "last tuesday")
    assert result.exit_code == 1
    assert result.output.startswith("Error: since: 'last tuesday' is neither a duration")
    assert "Traceback" not in result.output


def test_observe_follow_streams_new_flows_and_losses(agent):
    def feed():
        time.sleep(0.5)
        agent.observer.ingest(b"".join(starwars_events()))
        agent.observer.ring.append_lost("PERF_EVENT_RING_BUFFER", 7)

    feeder = threading.Thread(target=feed)
    feeder.start()
    result = observe(agent, "--follow", "--verdict", "DROPPED", "--timeout", "2", "-o", "json")
    feeder.join()
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines()]
    # only what happened after the follow started: 2 drops, then the loss record
    assert [("flow" in x) for x in lines] == [True, True, False]
    assert lines[2]["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 7}
    compact = CliRunner().invoke(cli, ["--socket", agent.path, "observe", "--last", "1",
                                       "--since", "1h"])
    last = compact.output.splitlines()
    assert len(last) == 2 and "xwing" in last[0]  # the last flow, and the loss after it
    assert last[1] == "EVENTS LOST: PERF_EVENT_RING_BUFFER 7"


def test_no_agent_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["--socket", str(tmp_path / "none.sock"), "observe"])
    assert result.exit_code != 0 and "cannot reach the pylium agent" in result.output


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (complete chunks only)."""
    _head, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size + 2:
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return body


def test_slow_follow_client_is_told_exactly_what_it_missed(tmp_path):
    """A follower that stops reading: every flow appended after it started is either
    delivered to it or counted in a HUBBLE_RING_BUFFER lost-events line."""
    import socket as socketlib

    observer = FlowObserver("node-a", starwars_resolver, capacity=500)
    with AgentThread(observer, tmp_path / "slow.sock") as agent:
        client = socketlib.socket(socketlib.AF_UNIX)
        client.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
        client.connect(agent.path)
        client.sendall(b"GET /v1/flows?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the follow starts at the ring's head
        start = observer.ring.head
        batch = b"".join(starwars_events() * 250)  # 1000 events
        for _ in range(40):
            observer.ingest(batch)
        appended = observer.ring.head - start
        assert appended == 40_000
        client.settimeout(3)
        data = b""
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        client.close()
    lines = [json.loads(x) for x in dechunk(data).split(b"\n") if x.strip()]
    delivered = sum(1 for x in lines if "flow" in x)
    lost = sum(int(x["lost_events"]["num_events_lost"]) for x in lines if "lost_events" in x)
    assert lost > 0, "the client never fell behind: the test did not exercise anything"
    assert {x["lost_events"]["source"] for x in lines if "lost_events" in x} == \
        {"HUBBLE_RING_BUFFER"}
    assert delivered + lost == appended
    assert observer.ring.follower_lost == lost


def test_pylium_ui_relays_the_page_and_graph(agent):
    import socket as socketlib
    import urllib.request

    from pylium.cli.cmd_observe import _ui_proxy

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _ui_proxy(agent.path, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui", timeout=10) as r:
            assert b"pylium service map" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/graph", timeout=10) as r:
            graph = json.load(r)
        verdicts = {(e["from"], e["to"]): e["verdict"] for e in graph["edges"]}
        assert verdicts == {("default/tiefighter", "default/deathstar"): "FORWARDED",
                            ("default/xwing", "default/deathstar"): "DROPPED"}
        # the port is taken now: a second `pylium ui` says so in one line
        result = CliRunner().invoke(cli, ["--socket", agent.path, "ui", "--port", str(port)])
        assert result.exit_code == 1 and result.output.startswith("Error: port: cannot listen")
    finally:
        server.shutdown()
        server.server_close()
