"""`pylium policy import|get|delete|trace` and `pylium identity list` against the real agent
API (policy + identity components on the embedded KV store) on a unix socket."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from pylium.agent.server import make_app
from pylium.cli.main import cli
from pylium.identity.labels import LabelSet


@pytest.fixture
def agent_socket(tmp_path, start_daemon):
    short = Path(tempfile.mkdtemp(prefix="pyl-pol-"))  # unix socket paths must be short
    sock = short / "a.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def serve():
        daemon = await start_daemon(tmp_path)
        await daemon.components["identity"].allocate(LabelSet.parse("app=web"))
        runner = web.AppRunner(make_app(daemon))
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        state.update(daemon=daemon, runner=runner)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()),
                                              loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(30), "test agent did not start"
    yield str(sock)

    async def stop():
        await state["runner"].cleanup()
        await state["daemon"].stop()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    sock.unlink(missing_ok=True)
    short.rmdir()


def run(sock: str, *args: str):
    result = CliRunner().invoke(cli, ["-H", sock, *args])
    return result


def test_import_get_trace_delete_and_identities(agent_socket, example_policies):
    imported = run(agent_socket, "policy", "import", str(example_policies / "l7-rule1.yaml"))
    assert imported.exit_code == 0 and "imported 1 policies" in imported.output
    assert run(agent_socket, "policy", "import", str(example_policies / "cidr-rule.yaml")).exit_code == 0
    listing = json.loads(run(agent_socket, "policy", "get", "-o", "json").output)
    assert sorted(p["name"] for p in listing["policies"]) == ["cidr-rule", "rule1"]
    one = json.loads(run(agent_socket, "policy", "get", "default/rule1", "-o", "json").output)
    assert one["policies"][0]["source"]["metadata"]["name"] == "rule1"
    traced = run(agent_socket, "policy", "trace", "--src", "org=empire,class=tiefighter",
                 "--dst", "org=empire,class=deathstar", "--dport", "80",
                 "--http-method", "PUT", "--http-path", "/v1/exhaust-port", "-o", "json")
    assert json.loads(traced.output)["verdict"] == "denied"
    ids = json.loads(run(agent_socket, "identity", "list", "-o", "json").output)
    labels = {i["id"]: i["labels"] for i in ids}
    assert labels[2] == ["reserved:world"] and ["k8s:app=web"] in labels.values()
    assert any("cidr:10.96.0.0/12" in v for v in labels.values())  # from cidr-rule
    table = run(agent_socket, "identity", "list").output
    assert "reserved:kube-apiserver" in table
    missing = run(agent_socket, "policy", "delete", "nope")
    assert missing.exit_code == 1 and "no policy named 'nope'" in missing.output
    gone = run(agent_socket, "policy", "delete", "--all", "-o", "json")
    assert len(json.loads(gone.output)["deleted"]) == 2
    assert json.loads(run(agent_socket, "policy", "get", "-o", "json").output)["policies"] == []


def test_import_prints_the_agents_warnings_on_stderr_and_exits_0(agent_socket, tmp_path):
    fqdn = tmp_path / "fqdn.yaml"
    fqdn.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                    "metadata: {name: fqdn}\nspec:\n  endpointSelector: {}\n  egress:\n"
                    "  - toEndpoints: [{}]\n  - toFQDNs: [{matchPattern: '*.example.com'}]\n")
    imported = run(agent_socket, "policy", "import", str(fqdn))
    assert imported.exit_code == 0
    assert imported.stdout.startswith("imported 1 policies, revision ")
    assert imported.stderr.splitlines() == [
        f"warning: {fqdn}: spec.egress[1].toFQDNs: not enforced yet by pylium (no DNS proxy "
        "learns the names' addresses): selects no peers, so the traffic it would allow is "
        "denied"]
    as_json = run(agent_socket, "policy", "import", str(fqdn), "-o", "json")
    assert as_json.exit_code == 0
    assert [w["path"] for w in json.loads(as_json.stdout)["warnings"]] == [
        "spec.egress[1].toFQDNs"]
    listing = json.loads(run(agent_socket, "policy", "get", "-o", "json").stdout)
    assert [p["name"] for p in listing["policies"]] == ["fqdn"]  # imported all the same
