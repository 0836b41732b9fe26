"""NodePort at XDP (`plugin_options.lb.acceleration: native`): with the tc NodePort filter
removed from the node's interface, world clients still reach the NodePort, so the XDP
program did the translation; the backend sees the client's address."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..endpoint.eplab import make_lab
from .conftest import CLIENT, SERVER


@pytest.fixture(scope="module")
def lab():
    lab = make_lab(plugin_options={"lb": {"acceleration": "native"}})
    try:
        lab.add_pod("web1", {"app": "web1"})
        lab.start_server("web1", [sys.executable, str(SERVER), "web1", "8080"], port=8080)
        yield lab
    finally:
        lab.down()


def node_sh(lab, *argv: str) -> str:
    return subprocess.run(lab.exec_argv("node1", list(argv)), capture_output=True, text=True,
                          check=True).stdout


def test_nodeport_is_translated_at_xdp(lab):
    status = lab.client().get("/v1/lb")
    assert status["acceleration"] in ("native", "generic") and status["nodeport_device"]
    dev = status["nodeport_device"]
    link = json.loads(node_sh(lab, "ip", "-j", "link", "show", "dev", dev))[0]
    assert "xdp" in link, link
    w1 = lab.pod("web1")["ip"]
    world_ip = lab.status()["world"]["ip"]
    node_ip = lab.node()["ip"]
    for proto in ("TCP", "UDP"):
        lab.client().put(f"/v1/service/default/x-{proto.lower()}", {
            "frontend": f"10.96.9.30:80/{proto}", "backends": [f"{w1}:8080"],
            "type": "NodePort", "node_port": 30095, "traffic_policy": "Local"})
    # take the tc NodePort program away: only XDP can translate now
    node_sh(lab, "tc", "filter", "del", "dev", dev, "ingress", "pref", "2")
    assert "from_netdev" not in node_sh(lab, "tc", "filter", "show", "dev", dev, "ingress")
    for proto in ("tcp", "udp"):
        out = subprocess.run(lab.exec_argv("world", [sys.executable, str(CLIENT), proto,
                                                     node_ip, "30095", "5"]),
                             capture_output=True, text=True, timeout=60).stdout
        assert out.splitlines() == [f"web1 {world_ip}"] * 5, out
