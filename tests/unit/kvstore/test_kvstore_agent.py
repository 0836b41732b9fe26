"""The agent selects the etcd plugin from its flags, reports its health, and serves
`pylium kvstore` from it; an unreachable etcd stops start-up with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pylium.agent.client import AgentClient
from pylium.kvstore.conformance import run
from pylium.kvstore.testing import EtcdServer, free_port
from pylium_kvstore_etcd.backend import EtcdKVStore

PYLIUM = str(Path(sys.executable).with_name("pylium"))


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if (not k.startswith("PYLIUM_") or k == "PYLIUM_BPFFS_ROOT")}


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="pyl-kva-"))  # short: unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pylium(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYLIUM, "-H", str(sock), *args], capture_output=True, text=True,
                          timeout=60, env=agent_env())


def test_agent_on_etcd_serves_kvstore_commands_and_reports_outage(workdir):
    sock = workdir / "agent.sock"
    with EtcdServer() as etcd:
        options = json.dumps({"endpoints": [etcd.endpoint], "timeout": 2})
        proc = subprocess.Popen(
            [PYLIUM, "agent", "--socket", str(sock), "--state-dir", str(workdir / "state"),
             "--node-name", "kv-node", "--kvstore", "etcd", "--kvstore-options", options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=agent_env())
        try:
            deadline = time.monotonic() + 60
            while not sock.exists():
                if proc.poll() is not None:
                    pytest.fail(f"agent exited {proc.returncode}: {proc.stdout.read()}")
                assert time.monotonic() < deadline, "agent did not come up"
                time.sleep(0.1)
            status = AgentClient(str(sock)).get("/v1/status")
            assert status["kvstore"]["backend"] == "etcd" and status["kvstore"]["healthy"]

            async def seed():
                async with EtcdKVStore({"endpoints": [etcd.endpoint]}, workdir) as kv:
                    await kv.put("e2e/nodes/kv-node", b'{"ip": "192.0.2.1"}')
            run(seed())
            out = pylium(sock, "kvstore", "get", "e2e/nodes/kv-node")
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"ip": "192.0.2.1"}
            listed = json.loads(pylium(sock, "kvstore", "list", "e2e/", "-o", "json").stdout)
            assert [i["key"] for i in listed["items"]] == ["e2e/nodes/kv-node"]

            etcd.stop()
            status = json.loads(pylium(sock, "status", "-o", "json").stdout)
            assert status["kvstore"]["healthy"] is False
            assert "etcd at" in status["kvstore"]["detail"]
            out = pylium(sock, "kvstore", "get", "e2e/nodes/kv-node")
            assert out.returncode != 0 and "Traceback" not in out.stderr
            assert out.stderr.startswith("Error: etcd at http://127.0.0.1:")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_agent_refuses_to_start_without_its_etcd(workdir):
    dead = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [PYLIUM, "agent", "--socket", str(workdir / "agent.sock"),
         "--state-dir", str(workdir / "state"), "--kvstore", "etcd",
         "--kvstore-options", json.dumps({"endpoints": [dead], "connect_timeout": 2})],
        capture_output=True, text=True, timeout=60, env=agent_env())
    assert out.returncode == 3  # a selected plugin that cannot start
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out.stderr
    prefix = "Error: kvstore 'etcd' (pylium-kvstore-etcd "
    assert errors[0].startswith(prefix), errors
    assert f") failed to start: cannot reach etcd at {dead}: " in errors[0], errors
