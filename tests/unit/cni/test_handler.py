"""The CNI verbs (`pylium.cni.handler`, run by the agent for every `pylium-cni` exec)
against a stand-in agent port that records calls and answers what each test sets: what the
verbs ask the endpoint manager, how its answers and errors map to CNI results and error
codes. The transports are tested in test_plugin.py, the real agent in tests/privileged/cni."""

from __future__ import annotations

import asyncio
import json

import pytest
from pylium.cni import handler, spec
from pylium.errors import Conflict, PyliumError, UserError

EP = {"id": 3, "name": "web-1", "ipv4": "10.200.1.7", "gateway": "10.200.1.1",
      "ifname": "lxc0123456789a", "mac": "02:00:00:00:00:01", "pod_ifname": "net1",
      "pod_mac": "02:00:00:00:00:02", "container_id": "abc"}


class FakePort:
    """Records every call; answers from `answers[verb]` (an exception is raised)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.answers: dict[str, object] = {}

    async def _answer(self, verb, *args):
        self.calls.append((verb, *args))
        await asyncio.sleep(0)  # a real port waits for the manager
        answer = self.answers.get(verb)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def create(self, *args):
        return await self._answer("create", *args)

    async def delete(self, *args):
        return await self._answer("delete", *args)

    async def check(self, *args):
        return await self._answer("check", *args)

    async def components(self):
        return await self._answer("components")

    async def gc(self, valid):
        return await self._answer("gc", valid)


def run(environ, stdin, port):
    return asyncio.run(handler.run(environ, stdin, port))


@pytest.fixture
def port():
    return FakePort()


def conf(version="1.0.0", **extra):
    return json.dumps({"cniVersion": version, "name": "pylium", "type": "pylium-cni",
                       "socket": "/run/agent.sock", **extra}).encode()


def env(command, tmp_path, **extra):
    netns = tmp_path / "netns"
    netns.touch()
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc", "CNI_NETNS": str(netns),
            "CNI_IFNAME": "net1", "CNI_PATH": "/opt/cni/bin", **extra}


def test_add_asks_the_agent_by_container_id_and_returns_its_result(port, tmp_path):
    port.answers["create"] = EP
    e = env("ADD", tmp_path, CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    code, result = run(e, conf("0.4.0", dns={"nameservers": ["10.96.0.10"]}), port)
    assert code == 0
    assert port.calls == [("create", "web-1", "shop", e["CNI_NETNS"], "abc", "net1")]
    assert result == {"cniVersion": "0.4.0",
                      "interfaces": [{"name": EP["ifname"], "mac": EP["mac"]},
                                     {"name": "net1", "mac": EP["pod_mac"],
                                      "sandbox": e["CNI_NETNS"]}],
                      "ips": [{"version": "4", "address": "10.200.1.7/32",
                               "gateway": "10.200.1.1", "interface": 1}],
                      "routes": [{"dst": "0.0.0.0/0"}],
                      "dns": {"nameservers": ["10.96.0.10"]}}


def test_add_without_k8s_args_names_the_endpoint_after_the_container(port, tmp_path):
    port.answers["create"] = EP
    e = env("ADD", tmp_path, CNI_CONTAINERID="ABC_1")
    assert run(e, conf(), port)[0] == 0
    assert port.calls == [("create", "abc-1", "default", e["CNI_NETNS"], "ABC_1", "net1")]


@pytest.mark.parametrize("error, code", [
    (Conflict("endpoint shop/web-1 already exists for container x"), spec.TRY_AGAIN_LATER),
    (PyliumError("the endpoint manager is not running"), spec.TRY_AGAIN_LATER),
    (UserError("netns: already belongs to endpoint a"), spec.FAILURE),
    (RuntimeError("internal error"), spec.FAILURE),
])
def test_agent_errors_become_cni_errors(port, tmp_path, error, code):
    port.answers["create"] = error
    rc, out = run(env("ADD", tmp_path), conf(), port)
    assert rc == 1 and out["code"] == code and set(out) == {"cniVersion", "code", "msg",
                                                             "details"}
    assert str(error) in out["details"]


def test_no_agent_is_try_again_later_and_status_50(tmp_path):
    missing = handler.Unreachable("the pylium agent is not running", "/x.sock: no such file")
    c = json.dumps({"cniVersion": "1.1.0", "name": "p", "socket": "/x.sock"}).encode()
    for verb in ("ADD", "DEL"):
        rc, out = handler.run_now(handler.run(env(verb, tmp_path), c, missing))
        assert (rc, out["code"], out["msg"]) == (1, spec.TRY_AGAIN_LATER,
                                                 "the pylium agent is not running")
    rc, out = handler.run_now(handler.run({"CNI_COMMAND": "STATUS"}, c, missing))
    assert out["code"] == spec.PLUGIN_NOT_AVAILABLE and "/x.sock" in out["details"]


def test_run_now_refuses_a_coroutine_that_waits(port, tmp_path):
    with pytest.raises(RuntimeError, match="event loop"):
        handler.run_now(handler.run(env("DEL", tmp_path), conf(), port))


def test_del_check_status_gc_requests(port, tmp_path):
    assert run(env("DEL", tmp_path), conf(), port) == (0, None)
    assert port.calls[-1] == ("delete", "abc", "net1")
    prev = spec.add_result("1.0.0", EP, env("ADD", tmp_path)["CNI_NETNS"], {})
    port.answers["check"] = {"endpoint": EP, "problems": []}
    assert run(env("CHECK", tmp_path), conf(prevResult=prev), port) == (0, None)
    assert port.calls[-1] == ("check", "abc", "net1")
    port.answers["check"] = {"endpoint": EP, "problems": ["net1 lacks 10.200.1.7/32"]}
    rc, out = run(env("CHECK", tmp_path), conf(prevResult=prev), port)
    assert rc == 1 and "lacks" in out["details"]
    port.answers["check"] = None
    rc, out = run(env("CHECK", tmp_path), conf(prevResult=prev), port)
    assert (rc, out["code"]) == (1, spec.FAILURE) and "no pylium endpoint" in out["msg"]
    port.answers["components"] = ["endpoint", "policy"]
    assert run({"CNI_COMMAND": "STATUS"}, conf("1.1.0"), port) == (0, None)
    port.answers["components"] = ["policy"]
    assert run({"CNI_COMMAND": "STATUS"}, conf("1.1.0"), port)[1]["code"] == 50
    port.answers["gc"] = {"deleted": [], "released": []}
    gc = conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "abc",
                                                         "ifname": "net1"}]})
    assert run({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, gc, port) == (0, None)
    assert port.calls[-1] == ("gc", [{"container_id": "abc", "ifname": "net1"}])


def test_version_and_error_version_follow_the_config(port):
    assert run({"CNI_COMMAND": "VERSION"}, b"", port) == (
        0, {"cniVersion": "1.1.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)})
    assert run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.3.1"}', port)[1][
        "cniVersion"] == "0.3.1"
    rc, out = run({"CNI_COMMAND": "ADD"}, b'{"cniVersion":"0.4.0","name":"p"}', port)
    assert (rc, out["cniVersion"], out["code"]) == (1, "0.4.0", 4)
    rc, out = run({"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "a", "CNI_NETNS": "/x",
                   "CNI_IFNAME": "eth0", "CNI_PATH": "/p"},
                  b'{"cniVersion":"0.3.1","name":"p"}', port)
    assert (rc, out["code"], out["msg"]) == (1, 1, "config version does not allow CHECK")
    assert port.calls == []


def test_a_bug_is_still_an_error_object(monkeypatch, port, tmp_path):
    async def boom(*_args):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(handler, "cmd_add", boom)
    rc, out = run(env("ADD", tmp_path), b'{"cniVersion":"1.0.0","name":"p"}', port)
    assert rc == 1 and out["code"] == 999 and "RuntimeError: unexpected" in out["details"]


@pytest.mark.parametrize("stdin, socket", [
    (b'{"cniVersion":"1.0.0","socket":"/run/a.sock"}', "/run/a.sock"),
    (b'{"socket":"relative.sock"}', handler.DEFAULT_SOCKET),
    (b'{"socket": 7}', handler.DEFAULT_SOCKET),
    (b"{not json", handler.DEFAULT_SOCKET),
    (b"", handler.DEFAULT_SOCKET),
])
def test_socket_of_the_config(stdin, socket):
    assert handler.socket_of(stdin) == socket
