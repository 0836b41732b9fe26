"""`POST /v1/cni` on the agent's API (an aiohttp app with a stand-in endpoint manager): the
query becomes the CNI environment (percent-decoded, only `CNI_*`), the body the config, and
the answer carries what the plugin prints and its exit code."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from urllib.parse import quote

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pylium.agent import routes_cni
from pylium.cni import handler
from pylium.errors import Conflict


class Manager:
    def __init__(self):
        self.deleted: list[tuple[str, str]] = []
        self.ipam = SimpleNamespace(gateway="10.200.0.1")

    async def delete_container(self, container_id, ifname):
        self.deleted.append((container_id, ifname))
        if container_id == "busy":
            raise Conflict("a create of container busy is under way")


def invoke(environ: dict[str, str], body: bytes, components=None):
    manager = Manager()
    daemon = SimpleNamespace(components={"endpoint": manager} if components is None
                             else components)

    async def go():
        app = web.Application()
        routes_cni.setup(app, daemon)
        async with TestClient(TestServer(app)) as client:
            query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                             for k, v in environ.items())
            resp = await client.post(f"{handler.ROUTE}?{query}", data=body)
            return resp.status, resp.headers.get(handler.EXIT_HEADER), await resp.read()

    return (*asyncio.run(go()), manager)


CONF = json.dumps({"cniVersion": "1.0.0", "name": "pylium", "socket": "/x.sock"}).encode()


def test_del_reaches_the_manager_with_the_decoded_environment():
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c-1.x", "CNI_IFNAME": "net1",
           "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "K8S_POD_NAME=a;X=%&+ é", "HOME": "/root"}
    status, code, body, manager = invoke(env, CONF)
    assert (status, code, body) == (200, "0", b"")
    assert manager.deleted == [("c-1.x", "net1")]


def test_errors_come_back_as_one_json_line_with_exit_1():
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "busy", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/p"}
    status, code, body, _ = invoke(env, CONF)
    assert (status, code) == (200, "1") and body.endswith(b"\n") and body.count(b"\n") == 1
    assert json.loads(body)["code"] == 11 and "under way" in json.loads(body)["details"]
    # an environment variable the runtime did not send is missing here too
    status, code, body, _ = invoke({"CNI_COMMAND": "DEL", "OTHER": "x"}, CONF)
    assert code == "1" and json.loads(body)["code"] == 4
    # no endpoint manager in this agent: try again later
    status, code, body, _ = invoke(env, CONF, components={})
    assert code == "1" and json.loads(body)["code"] == 11


def test_stdin_is_passed_as_bytes():
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "a", "CNI_NETNS": "/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/p"}
    status, code, body, _ = invoke(env, b"\xff\xfe")
    assert code == "1" and json.loads(body)["code"] == 6
