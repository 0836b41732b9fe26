"""`pylium-cni`'s verbs against a stand-in agent (a stdlib HTTP server on a unix socket
that records requests and answers what each test sets): the requests the plugin sends, how
agent answers map to CNI results and error codes, and the executable's stdout/exit code.
The real agent is exercised in tests/privileged/cni."""

from __future__ import annotations

import io
import json
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from pylium.cni import plugin, spec

EP = {"id": 3, "name": "web-1", "ipv4": "10.200.1.7", "gateway": "10.200.1.1",
      "ifname": "lxc0123456789a", "mac": "02:00:00:00:00:01", "pod_ifname": "net1",
      "pod_mac": "02:00:00:00:00:02", "container_id": "abc"}


class FakeAgent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        self.requests: list[tuple[str, str, object]] = []
        self.answers: dict[tuple[str, str], tuple[int, object]] = {}
        super().__init__(path, Handler)


class Handler(BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, body))
        route = self.path.split("?")[0]
        status, data = self.server.answers.get((self.command, route), (404, {"error": "nope"}))
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_PUT = do_DELETE = do_POST = _answer

    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass


@pytest.fixture
def agent(tmp_path):
    server = FakeAgent(str(tmp_path / "agent.sock"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def conf(agent, version="1.0.0", **extra):
    return json.dumps({"cniVersion": version, "name": "pylium", "type": "pylium-cni",
                       "socket": agent.server_address, **extra}).encode()


def env(command, tmp_path, **extra):
    netns = tmp_path / "netns"
    netns.touch()
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc", "CNI_NETNS": str(netns),
            "CNI_IFNAME": "net1", "CNI_PATH": "/opt/cni/bin", **extra}


def test_add_asks_the_agent_by_container_id_and_returns_its_result(agent, tmp_path):
    agent.answers[("PUT", "/v1/endpoint/web-1")] = (201, EP)
    e = env("ADD", tmp_path, CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    code, result = plugin.run(e, conf(agent, "0.4.0", dns={"nameservers": ["10.96.0.10"]}))
    assert code == 0
    assert agent.requests == [("PUT", "/v1/endpoint/web-1", {
        "namespace": "shop", "netns": e["CNI_NETNS"], "container_id": "abc", "ifname": "net1"})]
    assert result == {"cniVersion": "0.4.0",
                      "interfaces": [{"name": EP["ifname"], "mac": EP["mac"]},
                                     {"name": "net1", "mac": EP["pod_mac"],
                                      "sandbox": e["CNI_NETNS"]}],
                      "ips": [{"version": "4", "address": "10.200.1.7/32",
                               "gateway": "10.200.1.1", "interface": 1}],
                      "routes": [{"dst": "0.0.0.0/0"}],
                      "dns": {"nameservers": ["10.96.0.10"]}}


@pytest.mark.parametrize("status, data, code", [
    (409, {"error": "endpoint shop/web-1 already exists for container x"}, spec.TRY_AGAIN_LATER),
    (503, {"error": "the endpoint manager is not running"}, spec.TRY_AGAIN_LATER),
    (400, {"error": "netns: already belongs to endpoint a"}, spec.FAILURE),
    (500, {"error": "internal error"}, spec.FAILURE),
    (200, b"<html>not json</html>", spec.FAILURE),
])
def test_agent_answers_become_cni_errors(agent, tmp_path, status, data, code):
    agent.answers[("PUT", "/v1/endpoint/abc")] = (status, data)
    rc, out = plugin.run(env("ADD", tmp_path), conf(agent))
    assert rc == 1 and out["code"] == code and set(out) == {"cniVersion", "code", "msg",
                                                             "details"}
    if isinstance(data, dict):
        assert data["error"] in out["details"]


def test_no_agent_is_try_again_later_and_status_50(tmp_path):
    missing = json.dumps({"cniVersion": "1.1.0", "name": "p",
                          "socket": str(tmp_path / "none.sock")}).encode()
    assert plugin.run(env("ADD", tmp_path), missing)[1]["code"] == spec.TRY_AGAIN_LATER
    assert plugin.run(env("DEL", tmp_path), missing)[1]["code"] == spec.TRY_AGAIN_LATER
    assert plugin.run({"CNI_COMMAND": "STATUS"}, missing)[1]["code"] == \
        spec.PLUGIN_NOT_AVAILABLE


def test_del_check_status_gc_requests(agent, tmp_path):
    agent.answers[("DELETE", "/v1/endpoint/container/abc")] = (200, {"deleted": None})
    assert plugin.run(env("DEL", tmp_path), conf(agent)) == (0, None)
    assert agent.requests[-1][:2] == ("DELETE", "/v1/endpoint/container/abc?ifname=net1")
    prev = spec.add_result("1.0.0", EP, env("ADD", tmp_path)["CNI_NETNS"], {})
    agent.answers[("GET", "/v1/endpoint/container/abc/check")] = (
        200, {"endpoint": EP, "problems": []})
    assert plugin.run(env("CHECK", tmp_path), conf(agent, prevResult=prev)) == (0, None)
    agent.answers[("GET", "/v1/endpoint/container/abc/check")] = (
        200, {"endpoint": EP, "problems": ["net1 lacks 10.200.1.7/32"]})
    rc, out = plugin.run(env("CHECK", tmp_path), conf(agent, prevResult=prev))
    assert rc == 1 and "lacks" in out["details"]
    agent.answers[("GET", "/v1/status")] = (200, {"components": ["endpoint"]})
    assert plugin.run({"CNI_COMMAND": "STATUS"}, conf(agent, "1.1.0")) == (0, None)
    agent.answers[("GET", "/v1/status")] = (200, {"components": ["policy"]})
    assert plugin.run({"CNI_COMMAND": "STATUS"}, conf(agent, "1.1.0"))[1]["code"] == 50
    agent.answers[("POST", "/v1/endpoint-gc")] = (200, {"deleted": [], "released": []})
    gc = conf(agent, "1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "abc",
                                                                "ifname": "net1"}]})
    assert plugin.run({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, gc) == (0, None)
    assert agent.requests[-1] == ("POST", "/v1/endpoint-gc",
                                  {"valid": [{"container_id": "abc", "ifname": "net1"}]})


def test_version_and_error_version_follow_the_config():
    assert plugin.run({"CNI_COMMAND": "VERSION"}, b"") == (
        0, {"cniVersion": "1.1.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)})
    assert plugin.run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.3.1"}')[1][
        "cniVersion"] == "0.3.1"
    rc, out = plugin.run({"CNI_COMMAND": "ADD"}, b'{"cniVersion":"0.4.0","name":"p"}')
    assert (rc, out["cniVersion"], out["code"]) == (1, "0.4.0", 4)
    rc, out = plugin.run({"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "a", "CNI_NETNS": "/x",
                          "CNI_IFNAME": "eth0", "CNI_PATH": "/p"},
                         b'{"cniVersion":"0.3.1","name":"p"}')
    assert (rc, out["code"], out["msg"]) == (1, 1, "config version does not allow CHECK")


def test_a_bug_is_still_an_error_object(monkeypatch, tmp_path):
    def boom(*_args):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(plugin, "cmd_add", boom)
    rc, out = plugin.run(env("ADD", tmp_path), b'{"cniVersion":"1.0.0","name":"p"}')
    assert rc == 1 and out["code"] == 999 and "RuntimeError: unexpected" in out["details"]


def test_main_writes_one_json_line_and_the_exit_code():
    out = io.StringIO()
    assert plugin.main({"CNI_COMMAND": "VERSION"}, io.BytesIO(b"{}"), out) == 0
    assert json.loads(out.getvalue())["supportedVersions"]
    out = io.StringIO()
    assert plugin.main({}, io.BytesIO(b"garbage"), out) == 1
    assert json.loads(out.getvalue())["code"] == 4


@pytest.mark.parametrize("stdin, environ, code", [
    (b"{not json", {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "a", "CNI_NETNS": "/x",
                    "CNI_IFNAME": "eth0", "CNI_PATH": "/p"}, 6),
    (b'{"cniVersion":"1.0.0","name":"p"}', {"CNI_COMMAND": "DEL"}, 4),
    (b"", {}, 4),
])
def test_the_executable_never_prints_a_traceback(stdin, environ, code):
    exe = Path(sys.executable).with_name("pylium-cni")
    proc = subprocess.run([str(exe)], input=stdin, capture_output=True, env=environ,
                          timeout=30, check=False)
    assert proc.returncode == 1 and proc.stderr == b""
    assert json.loads(proc.stdout)["code"] == code
