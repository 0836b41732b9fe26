"""`/v1/bpf/*` routes and the `pylium bpf` / `pylium monitor --direct` commands against a
real datapath (the API served on a unix socket, the CLI run in-process)."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

from aiohttp import web
from click.testing import CliRunner
from pylium.agent import routes_datapath
from pylium.cli.main import cli
from pylium.policy.mapstate import PROTO_TCP, Direction, EndpointPolicy, PolicyEntry, PolicyKey

from .test_policy_scenarios import real_run

PODS = {"a": ("10.212.0.10", 1200), "b": ("10.212.0.11", 1201)}


class ApiServer:
    def __init__(self, datapath, sock: str):
        self.sock = sock
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        daemon = SimpleNamespace(components={"datapath": datapath})
        self.app = web.Application()
        routes_datapath.setup(self.app, daemon)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        from pylium.agent.server import errors_as_json

        self.app.middlewares.append(errors_as_json)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.UnixSite(self.runner, self.sock).start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_bpf_commands_and_trace_route(node, tmp_path):
    n = node("api", PODS)
    n.dp.update_policy(2, EndpointPolicy(True, False, {
        PolicyKey(1200, Direction.INGRESS, PROTO_TCP, 80, 16): PolicyEntry()}, 4))
    n.dp.upsert_ipcache("172.16.0.0/12", 16777300, "192.0.2.9")
    real_run(n, "b", Direction.INGRESS, PODS["a"][0], PODS["b"][0], PROTO_TCP, 41000, 80)
    real_run(n, "b", Direction.INGRESS, PODS["a"][0], PODS["b"][0], PROTO_TCP, 41001, 22)
    server = ApiServer(n.dp, str(tmp_path / "api.sock"))
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, ["--socket", server.sock, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    try:
        policy = json.loads(run("bpf", "policy", "get", "2", "-o", "json"))
        assert policy["revision"] == 4 and policy["ingress_enforced"] and not policy["egress_enforced"]
        assert policy["entries"] == [{"verdict": "allow", "direction": "ingress", "identity": 1200,
                                      "protocol": "TCP", "port": 80, "port_prefix_len": 16,
                                      "port_range": [80, 80], "proxy_port": 0, "prefix_len": 64}]
        assert "80/TCP" in run("bpf", "policy", "get", "2")
        missing = runner.invoke(cli, ["--socket", server.sock, "bpf", "policy", "get", "9"])
        assert missing.exit_code != 0 and "no policy map loaded for endpoint 9" in missing.output
        assert {"cidr": "172.16.0.0/12", "identity": 16777300, "tunnel_endpoint": "192.0.2.9"} in \
            json.loads(run("bpf", "ipcache", "list", "-o", "json"))
        ct = json.loads(run("bpf", "ct", "list", "-o", "json"))
        assert [(c["sport"], c["direction"]) for c in ct] == [(41000, "ingress")]
        metrics = {(m["reason_desc"], m["direction"]): m["packets"]
                   for m in json.loads(run("bpf", "metrics", "list", "-o", "json"))}
        assert metrics == {("Forwarded", "ingress"): 1, ("Policy denied", "ingress"): 1}
        assert "Policy denied" in run("bpf", "metrics", "list")
        eps = json.loads(run("bpf", "endpoint", "list", "-o", "json"))
        assert [(e["ep_id"], e["ipv4"], e["identity"]) for e in eps] == [
            (1, "10.212.0.10", 1200), (2, "10.212.0.11", 1201)]
        from pylium.agent.client import AgentClient

        client = AgentClient(server.sock)
        verdict = client.post("/v1/bpf/trace", {"ep_id": 2, "direction": "ingress",
                                                "src_ip": PODS["a"][0], "dst_ip": PODS["b"][0],
                                                "sport": 1, "dport": 22, "proto": 6})
        assert (verdict["action"], verdict["drop_reason"], verdict["peer_identity"]) == ("dropped", 133, 1200)
    finally:
        server.stop()
    # the same drop read straight from the pinned ring buffer (no agent consuming it)
    out = runner.invoke(cli, ["monitor", "--direct", "--bpffs-root", str(n.root), "--type", "drop",
                              "-n", "1"], catch_exceptions=False).output
    assert out.startswith("xx drop (Policy denied) endpoint 2 (ingress), identity 1200->1201: "
                          "10.212.0.10:41001 -> 10.212.0.11:22 tcp"), out
