"""Socket LB through a real agent (`plugin_options.lb.socket_lb_cgroup`): a pod process in
that cgroup holding a connected UDP socket to a service is moved to a live backend when its
backend leaves the service (the agent destroys the socket; the process reconnects and
connect() picks again), instead of talking to the removed backend forever (cilium#24417)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..endpoint.eplab import make_lab
from .conftest import SERVER

VIP = "10.96.9.20"

UDP_LOOP = r"""
import socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
sock = None
while time.monotonic() < end:
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(0.3)
        sock.connect((ip, port))
        print("connect", flush=True)
    try:
        sock.send(b"hi")
        print(sock.recv(100).decode().split()[0], flush=True)
    except OSError as exc:
        print("error", type(exc).__name__, flush=True)
        sock.close(); sock = None
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def cgroup():
    path = Path("/sys/fs/cgroup/unified") / f"pylium-lbsock-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture(scope="module")
def lab(cgroup):
    lab = make_lab(plugin_options={"lb": {"socket_lb_cgroup": str(cgroup)}})
    try:
        for name in ("client", "web1", "web2"):
            lab.add_pod(name, {"app": name})
        for name in ("web1", "web2"):
            lab.start_server(name, [sys.executable, str(SERVER), name, "8080"], port=8080)
        yield lab
    finally:
        lab.down()


def test_connected_udp_socket_moves_off_a_removed_backend(lab, cgroup):
    w1, w2 = lab.pod("web1")["ip"], lab.pod("web2")["ip"]
    assert lab.client().get("/v1/lb")["socket_lb_cgroup"] == str(cgroup)
    lab.client().put("/v1/service/default/udp", {"frontend": f"{VIP}:53/UDP",
                                                 "backends": [f"{w1}:8080"]})
    argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh",
            *lab.exec_argv("client", [sys.executable, "-c", UDP_LOOP, VIP, "53", "4"])]
    loop = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        # web2 joins and web1 leaves: the socket connected to web1 must not stay there
        lab.client().put("/v1/service/default/udp", {"frontend": f"{VIP}:53/UDP",
                                                     "backends": [f"{w2}:8080"]})
        out, _ = loop.communicate(timeout=30)
    finally:
        loop.kill()
        lab.client().delete("/v1/service/default/udp")
    lines = out.splitlines()
    answers = [x for x in lines if x in ("web1", "web2")]
    assert answers and answers[0] == "web1", lines
    assert lines.count("connect") == 2, lines  # reset once, reconnected once
    assert answers[-10:] == ["web2"] * 10, lines
