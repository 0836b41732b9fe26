"""The flow side in the Star Wars lab: real pods, the real datapath's events, one agent.
`pylium observe` shows both sides with pod names and labels, the node's metrics endpoint
passes promtool, and the service map has the demo's edges."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pylium.lab.lab import Lab

PYLIUM = str(Path(sys.executable).with_name("pylium"))


@pytest.fixture(scope="module")
def lab():
    lab = Lab(f"pf{uuid.uuid4().hex[:4]}")
    try:
        lab.up(nodes=1, demo="starwars",
               agent_settings={"prometheus_serve_addr": "127.0.0.1:9962"})
        yield lab
    finally:
        lab.down()


def observe(lab: Lab, *args: str) -> list[dict]:
    sock = lab.node()["socket"]
    proc = subprocess.run([PYLIUM, "-H", sock, "observe", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def test_observe_shows_starwars_flows_with_both_sides(lab):
    deathstar = lab.pod("deathstar")["ip"]
    for pod in ("tiefighter", "xwing"):
        lab.exec(pod, ["curl", "-s", "-m", "2", "-XPOST",
                       f"http://{deathstar}/v1/request-landing"], timeout=30)

    def xwing_flows():
        return [r["flow"] for r in observe(lab, "--from-pod", "default/xwing", "--to-port", "80",
                                           "--since", "10m") if "flow" in r]

    flows = wait_for(xwing_flows)
    assert flows, "no xwing → deathstar:80 flows observed"
    f = flows[-1]
    assert f["IP"]["destination"] == deathstar
    assert f["l4"]["TCP"]["destination_port"] == 80
    assert f["source"]["pod_name"] == "xwing" and f["destination"]["pod_name"] == "deathstar"
    assert "k8s:org=alliance" in f["source"]["labels"]
    assert "k8s:org=empire" in f["destination"]["labels"]
    assert f["source"]["identity"] != f["destination"]["identity"]
    assert f["node_name"] == "node1"
    assert f["verdict"] in ("FORWARDED", "DROPPED")
    tie = [r["flow"] for r in observe(lab, "--from-pod", "tiefighter", "--since", "10m")
           if "flow" in r]
    assert tie and all(x["source"]["pod_name"] == "tiefighter" for x in tie)
    assert {x["verdict"] for x in tie} == {"FORWARDED"}  # no policy denies the empire

    graph = json.loads(subprocess.run(
        ["curl", "-s", "--unix-socket", lab.node()["socket"], "http://agent/v1/ui/graph"],
        capture_output=True, text=True, timeout=30).stdout)
    pairs = {(e["from"], e["to"]) for e in graph["edges"]}
    assert {("default/tiefighter", "default/deathstar"),
            ("default/xwing", "default/deathstar")} <= pairs


def test_node_metrics_endpoint(lab):
    netns = lab.node()["netns"]
    body = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "curl", "-s",
                           "http://127.0.0.1:9962/metrics"], capture_output=True,
                          timeout=30).stdout
    text = body.decode()
    assert "pylium_endpoint 3.0" in text
    assert "pylium_flow_reader_attached 1.0" in text
    assert 'pylium_events_lost_total{source="datapath_ring_buffer"}' in text
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
