"""`pylium service list` in Cilium's shape: the JSON entry (`spec`/`status`, frontend-address,
backend-addresses, flags.type/trafficPolicy) and the table's columns and backend lines."""

from __future__ import annotations

from pylium.agent.routes_lb import service_json
from pylium.cli.cmd_service import service_table
from pylium.lb.model import Service
from rich.console import Console


def test_service_json_and_table_follow_cilium():
    svc = Service.from_json("default/deathstar", {
        "frontend": "10.96.0.10:80", "type": "NodePort", "node_port": 30080,
        "traffic_policy": "Local",
        "backends": ["10.200.1.2:80", {"address": "10.200.1.3:80", "state": "terminating"}]},
        id=7)
    entry = service_json(svc)
    spec = entry["spec"]
    assert spec["id"] == 7
    assert spec["frontend-address"] == {"ip": "10.96.0.10", "port": 80, "protocol": "TCP",
                                        "scope": "external"}
    assert spec["backend-addresses"][1] == {"ip": "10.200.1.3", "port": 80, "protocol": "TCP",
                                            "state": "terminating"}
    assert spec["flags"]["type"] == "NodePort" and spec["flags"]["trafficPolicy"] == "Local"
    assert (spec["flags"]["name"], spec["flags"]["namespace"]) == ("deathstar", "default")
    assert entry["status"]["realized"]["id"] == 7
    console = Console(width=200, record=True)
    console.print(service_table([entry]))
    text = console.export_text()
    header = text.splitlines()[0].split()
    assert header == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert "1 => 10.200.1.2:80/TCP (active)" in text
    assert "2 => 10.200.1.3:80/TCP (terminating)" in text
