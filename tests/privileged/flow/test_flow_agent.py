"""A real `pylium agent` (datapath loaded, pinned under a unique bpffs dir): the flow
component attaches to the datapath's events ring buffer, serves metrics and the service map
on prometheus_serve_addr, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

PYLIUM = str(Path(sys.executable).with_name("pylium"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agent_flow_component_lifecycle(tmp_path):
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    bpffs = Path(f"/sys/fs/bpf/pylium-test-flowagent-{uuid.uuid4().hex[:8]}")
    port = free_port()
    sock = tmp_path / "agent.sock"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "node_name": "flow-node", "socket": str(sock), "state_dir": str(tmp_path / "state"),
        "bpffs_root": str(bpffs), "prometheus_serve_addr": f"127.0.0.1:{port}"}))
    log = open(tmp_path / "agent.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLIUM_")}
    proc = subprocess.Popen([PYLIUM, "agent", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            res = subprocess.run(["curl", "-s", "--unix-socket", str(sock),
                                  "http://agent/v1/flows/status"], capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.startswith("{"):
                status = json.loads(res.stdout)
            else:
                time.sleep(0.2)
        assert status is not None, (tmp_path / "agent.log").read_text()
        assert status["status"] == f"reading {bpffs / 'events'}", status
        assert status["node_name"] == "flow-node"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read()
        assert b"pylium_flow_reader_attached 1.0" in body
        assert b"pylium_kvstore_healthy 1.0" in body
        check = subprocess.run(["promtool", "check", "metrics"], input=body,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui", timeout=10) as r:
            assert b"pylium service map" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = (tmp_path / "agent.log").read_text()
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(bpffs, ignore_errors=True)
