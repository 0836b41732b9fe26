"""The conflist the agent writes once its API socket answers (`pylium.cni.component`)."""

from __future__ import annotations

import asyncio
import json
import socket
import types

from pylium.cni import component
from pylium.config import AgentConfig, load


def test_conflist_shape_and_atomic_write(tmp_path):
    path = component.write_conflist(tmp_path / "net.d", "/var/run/pylium/pylium.sock")
    assert path.name == "05-pylium.conflist"
    conf = json.loads(path.read_text())
    assert conf["cniVersion"] == "1.0.0" and "1.1.0" in conf["cniVersions"]
    assert conf["name"] == "pylium"
    assert conf["plugins"] == [{"type": "pylium-cni", "socket": "/var/run/pylium/pylium.sock"}]
    assert [p.name for p in path.parent.iterdir()] == ["05-pylium.conflist"]  # no temp left


def test_written_only_once_the_socket_answers(tmp_path):
    sock_path = str(tmp_path / "agent.sock")
    conf_dir = tmp_path / "net.d"

    async def go():
        writer = component.CNIConfig(conf_dir, sock_path)
        task = asyncio.create_task(writer.write_when_ready())
        await asyncio.sleep(0.3)
        before = (conf_dir / component.CONFLIST_NAME).exists()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(sock_path)
        server.listen()
        try:
            await asyncio.wait_for(task, 5)
        finally:
            server.close()
        return before, writer.written

    before, written = asyncio.run(go())
    assert not before and written == conf_dir / component.CONFLIST_NAME
    assert json.loads(written.read_text())["plugins"][0]["socket"] == sock_path


def test_off_by_default(tmp_path):
    cfg = AgentConfig(state_dir=tmp_path)
    assert cfg.cni_conf_dir == ""
    assert load(environ={
        "PYLIUM_CNI_CONF_DIR": "/etc/cni/net.d", "PYLIUM_STATE_DIR": str(tmp_path)},
    ).cni_conf_dir == "/etc/cni/net.d"
    daemon = types.SimpleNamespace(config=cfg, spawn=lambda coro: coro.close())
    assert asyncio.run(component.start(daemon)) is None
