"""Helpers for endpoint tests: labs (a node netns running a real agent subprocess, pods
wired by it) with unique names, so their netns, sockets, pins and state never collide."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

from pylium.agent.client import AgentClient
from pylium.lab.lab import Lab

#: a TCP server answering "ok <port>" on every port given, for policy tests
PORTS_SERVER = Path(__file__).with_name("ports_server.py")


def make_lab(**settings) -> Lab:
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
                   shell=True, check=True)
    lab = Lab("t" + secrets.token_hex(3))
    lab.up(agent_settings=settings)
    return lab


def api(lab: Lab) -> AgentClient:
    return lab.client()


def import_policy(lab: Lab, text: str) -> int:
    revision = api(lab).post("/v1/policy", {"text": text, "name": "test"})["revision"]
    wait_regenerated(lab)
    return revision


def delete_policies(lab: Lab) -> None:
    api(lab).delete("/v1/policy?all=true")
    wait_regenerated(lab)


def wait_regenerated(lab: Lab, timeout: float = 10.0) -> None:
    """Regeneration follows a policy change asynchronously (the change is queued before
    the import/delete request returns): wait until it reached every endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api(lab).get("/v1/endpoint-regeneration")
        if not status["busy"]:
            assert status["not_ready"] == [], status
            return
        time.sleep(0.05)
    raise AssertionError(f"regeneration still busy after {timeout}s: "
                         f"{json.dumps(api(lab).get('/v1/endpoint'), indent=1)}")


def tcp(lab: Lab, src: str, ip: str, port: int) -> bool:
    """Can `src` open a TCP connection to ip:port (and read the server's answer)?"""
    proc = lab.exec(src, ["nc", "-w", "2", ip, str(port)], timeout=20)
    return proc.returncode == 0 and f"ok {port}" in proc.stdout


def ping(lab: Lab, src: str, ip: str) -> bool:
    return lab.exec(src, ["ping", "-c", "1", "-W", "1", ip], timeout=20).returncode == 0


def serve_ports(lab: Lab, target: str, *ports: int) -> None:
    lab.start_server(target, [sys.executable, str(PORTS_SERVER), *map(str, ports)],
                     port=ports[0])
