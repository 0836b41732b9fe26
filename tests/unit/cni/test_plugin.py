"""The `pylium-cni` transports — the native one (`native/pylium-cni.c`, built here with the
machine's compiler) and the Python one (`pylium.cni.plugin`) — against a stand-in agent on a
unix socket that records what arrives and answers what each test sets: the environment and
stdin reach the agent intact in one `POST /v1/cni`, its answer comes back as stdout and exit
code, and without an agent (or with something else answering) the transport still prints a
CNI error object. The CNI verbs themselves are tested in test_handler.py."""

from __future__ import annotations

import io
import json
import socketserver
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from pylium.cni import handler, native, plugin, spec


class FakeAgent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        self.requests: list[tuple[str, str, bytes]] = []
        self.answer = b""
        super().__init__(path, Handler)

    def reply(self, status: int = 200, body: bytes = b"", exit_code: str | None = "0",
              extra: str = "") -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}"
        if exit_code is not None:
            head += f"{handler.EXIT_HEADER}: {exit_code}\r\n"
        self.answer = head.encode() + b"\r\n" + body


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = self.rfile.read(1)
            if not byte:
                return
            head += byte
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (line.partition(": ") for line in lines)
                      if k.lower() == "content-length")
        method, target, _ = lines[0].split(" ")
        self.server.requests.append((method, target, self.rfile.read(length)))
        self.wfile.write(self.server.answer)


@pytest.fixture
def agent(tmp_path):
    server = FakeAgent(str(tmp_path / "agent.sock"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def native_exe(tmp_path_factory):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    directory = tmp_path_factory.mktemp("native")
    # configs naming no socket go to this path (a test's agent binds it)
    return native.build(directory / "pylium-cni", default_socket=str(directory / "dflt.sock"))


def call(transport, environ, stdin, native_exe=None):
    """(exit code, stdout as JSON or None) of one invocation."""
    if transport == "python":
        out = io.StringIO()
        code = plugin.main(environ, io.BytesIO(stdin), out)
        text = out.getvalue()
    else:
        proc = subprocess.run([str(native_exe)], input=stdin, capture_output=True,
                              env=environ, timeout=30, check=False)
        assert proc.stderr == b""
        code, text = proc.returncode, proc.stdout.decode()
    assert text == "" or (text.endswith("\n") and text.count("\n") == 1)
    return code, json.loads(text) if text else None


@pytest.fixture(params=["python", "native"])
def transport(request):
    if request.param == "native":
        return "native", request.getfixturevalue("native_exe")
    return "python", None


def conf(agent_or_path, version="1.0.0", **extra):
    path = getattr(agent_or_path, "server_address", agent_or_path)
    return json.dumps({"cniVersion": version, "name": "pylium", "type": "pylium-cni",
                       "socket": path, **extra}).encode()


def test_environment_and_stdin_reach_the_agent_and_its_answer_comes_back(agent, transport):
    kind, exe = transport
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.7/32"}]}
    agent.reply(body=json.dumps(result).encode() + b"\n")
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x y",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1&x=%41+é",
               "PATH": "/usr/bin", "OTHER": "not sent"}
    stdin = conf(agent, dns={"search": ["a\"b\\c", "é\u0000"]}) + b" \r\n\t"
    assert call(kind, environ, stdin, exe) == (0, result)
    ((method, target, body),) = agent.requests
    route, _, query = target.partition("?")
    assert (method, route, body) == ("POST", handler.ROUTE, stdin)
    assert dict(parse_qsl(query, keep_blank_values=True)) == {
        k: v for k, v in environ.items() if k.startswith("CNI_")}


def test_the_agents_exit_code_and_empty_answer(agent, transport):
    kind, exe = transport
    error = {"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "x"}
    agent.reply(body=json.dumps(error).encode() + b"\n", exit_code="1")
    assert call(kind, {"CNI_COMMAND": "DEL"}, conf(agent, "0.4.0"), exe) == (1, error)
    agent.reply(body=b"")
    assert call(kind, {"CNI_COMMAND": "DEL"}, conf(agent), exe) == (0, None)


@pytest.mark.parametrize("status, exit_code, extra", [
    (404, "1", ""),     # an agent without the CNI route
    (200, None, ""),    # something that is not the agent's CNI answer
    (200, "7", ""),
    (500, "0", ""),
])
def test_answers_that_are_not_cni_answers_are_999(agent, transport, status, exit_code, extra):
    kind, exe = transport
    agent.reply(status, b'{"error": "no such route"}', exit_code, extra)
    rc, out = call(kind, {"CNI_COMMAND": "ADD"}, conf(agent, "0.4.0"), exe)
    assert rc == 1 and out["code"] == spec.FAILURE and out["cniVersion"] == "0.4.0"
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert f"HTTP {status}" in out["details"] and agent.server_address in out["details"]


def test_garbage_from_the_socket_is_999(agent, transport):
    kind, exe = transport
    agent.answer = b"SSH-2.0-OpenSSH\r\n\r\n"
    rc, out = call(kind, {"CNI_COMMAND": "ADD"}, conf(agent), exe)
    assert (rc, out["code"]) == (1, spec.FAILURE)


def test_an_agent_closing_without_answering_is_try_again_later(agent, transport):
    kind, exe = transport
    agent.answer = b""
    rc, out = call(kind, {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "CNI_IFNAME": "eth0",
                          "CNI_PATH": "/opt/cni/bin"}, conf(agent), exe)
    assert (rc, out["code"]) == (1, spec.TRY_AGAIN_LATER) and "closed" in out["details"]
    rc, out = call(kind, {"CNI_COMMAND": "STATUS"}, conf(agent), exe)
    assert (rc, out["code"]) == (1, spec.PLUGIN_NOT_AVAILABLE)


def test_no_agent_is_try_again_later_and_status_50(tmp_path, transport):
    kind, exe = transport
    missing = conf(str(tmp_path / "none.sock"), "0.4.0")
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc",
               "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
               "CNI_PATH": "/opt/cni/bin"}
    for verb in ("ADD", "DEL"):
        rc, out = call(kind, {**environ, "CNI_COMMAND": verb}, missing, exe)
        assert (rc, out["code"], out["cniVersion"]) == (1, spec.TRY_AGAIN_LATER, "0.4.0")
        assert "agent is not running" in out["msg"] and "none.sock" in out["details"]
    rc, out = call(kind, {"CNI_COMMAND": "STATUS"}, missing, exe)
    assert (rc, out["code"]) == (1, spec.PLUGIN_NOT_AVAILABLE)


@pytest.mark.parametrize("stdin, version", [
    (b"", "1.1.0"), (b'{"cniVersion": "0.3.1"}', "0.3.1"), (b'{"cniVersion": "9.9"}', "1.1.0"),
])
def test_version_is_answered_without_an_agent(transport, stdin, version):
    kind, exe = transport
    assert call(kind, {"CNI_COMMAND": "VERSION"}, stdin, exe) == (
        0, {"cniVersion": version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)})


def test_a_config_without_a_usable_socket_goes_to_the_default_one(native_exe, monkeypatch):
    """The default agent socket then says what is wrong with the config (the native
    transport here was built with a default socket of the test's)."""
    server = FakeAgent(str(native_exe.with_name("dflt.sock")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(handler, "DEFAULT_SOCKET", server.server_address)
    try:
        server.reply(body=b'{"code": 6}\n', exit_code="1")
        for stdin in (b"{not json", b'{"socket": "relative.sock"}', b"[1]", b"\xff\xfe"):
            for kind in ("python", "native"):
                assert call(kind, {"CNI_COMMAND": "ADD"}, stdin, native_exe) == (
                    1, {"code": 6}), (kind, stdin)
            assert [r[2] for r in server.requests[-2:]] == [stdin, stdin]
    finally:
        server.shutdown()
        server.server_close()


def test_python_transport_without_an_agent_still_reports_bad_configs_precisely(tmp_path):
    """With no agent to ask, the Python transport runs the agent's handler locally."""
    missing = str(tmp_path / "none.sock")
    assert plugin.run({"CNI_COMMAND": "ADD"}, conf(missing))[1]["code"] == 4
    assert plugin.run({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "a", "CNI_NETNS": "/x",
                       "CNI_IFNAME": "eth0", "CNI_PATH": "/p"},
                      conf(missing, ipam={"type": "host-local"}))[1]["code"] == 2


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
