"""Fixtures: the datapath test node (a node netns with pods and a `Datapath` opened in it)
plus helpers to run the LB test server and client in pods."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..datapath.conftest import node  # noqa: F401  (the datapath tests' node fixture)

HERE = Path(__file__).parent
SERVER = HERE / "lb_server.py"
CLIENT = HERE / "lb_client.py"


def nsenter(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


@pytest.fixture
def servers():
    """start(ns, name, port): an lb_server.py in netns `ns`; all stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(ns: str, name: str, port: int) -> None:
        proc = subprocess.Popen(nsenter(ns, sys.executable, str(SERVER), name, str(port)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(nsenter(ns, "ss", "-Hltn", f"sport = :{port}"),
                                 capture_output=True, text=True).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"server {name} did not listen on {port} in {ns}")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def client(ns: str, proto: str, ip: str, port: int, count: int = 1,
           sport: int = 0) -> list[str]:
    """Answers of `count` fresh connections from netns `ns` ("NAME PEER_IP" or "ERR ...")."""
    out = subprocess.run(nsenter(ns, sys.executable, str(CLIENT), proto, ip, str(port),
                                 str(count), str(sport)),
                         capture_output=True, text=True, timeout=20 + 3 * count)
    return out.stdout.splitlines()
