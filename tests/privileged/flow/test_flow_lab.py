"""The flow side in the Star Wars lab: real pods, the real datapath's events, one agent.
`pylium observe` shows both sides with pod names and labels, the node's metrics endpoint
passes promtool, and the service map has the demo's edges."""

from __future__ import annotations

import json
import re
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
    assert "pylium_endpoint 4.0" in text  # two deathstar replicas, tiefighter, xwing
    assert "pylium_flow_reader_attached 1.0" in text
    assert 'pylium_events_lost_total{source="datapath_ring_buffer"} 0.0' in text
    # the other components answer too: policies, identities, BPF map pressure, datapath
    # packet counters (its metrics map: bytes are only known there)
    for pattern in (r"^pylium_policy \d", r"^pylium_identity [1-9]",
                    r'^pylium_bpf_map_pressure\{map_name="endpoints"\} 0\.\d+',
                    r'^pylium_forward_count_total\{direction="INGRESS"\} [1-9]',
                    r'^pylium_forward_bytes_total\{direction="INGRESS"\} [1-9]',
                    r'^pylium_flows_processed_total\{subtype="trace",type="L3_L4",'
                    r'verdict="FORWARDED"\} [1-9]'):
        assert re.search(pattern, text, re.M), pattern
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_starwars_acceptance_xwing_dropped_by_policy(lab, example_policies):
    """The issue's acceptance: with rule1 (only org=empire may reach deathstar:80),
    `pylium observe --verdict DROPPED -o json` shows xwing → deathstar:80 DROPPED with
    POLICY_DENIED and both sides' labels; tiefighter's flows stay FORWARDED."""
    rule = example_policies / "l3-l4-rule1.yaml"
    sock = lab.node()["socket"]
    proc = subprocess.run([PYLIUM, "-H", sock, "policy", "import", str(rule)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deathstar = lab.pod("deathstar")["ip"]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))

    def land(pod: str) -> subprocess.CompletedProcess:
        return lab.exec(pod, ["curl", "-s", "-m", "2", "-XPOST",
                              f"http://{deathstar}/v1/request-landing"], timeout=30)

    def denied():
        land("xwing")
        return [r["flow"] for r in observe(lab, "--verdict", "DROPPED", "--since", since)
                if "flow" in r and r["flow"].get("drop_reason_desc") == "POLICY_DENIED"]

    drops = wait_for(denied, timeout=30)  # regeneration after the import is asynchronous
    assert drops, "no POLICY_DENIED drop observed for the xwing"
    f = drops[-1]
    assert f["verdict"] == "DROPPED" and f["drop_reason"] == 133
    assert f["source"]["pod_name"] == "xwing" and f["destination"]["pod_name"] == "deathstar"
    assert f["l4"]["TCP"]["destination_port"] == 80
    assert "k8s:org=alliance" in f["source"]["labels"]
    assert {"k8s:org=empire", "k8s:class=deathstar"} <= set(f["destination"]["labels"])
    assert f["traffic_direction"] == "INGRESS"

    assert "Ship landed" in land("tiefighter").stdout
    tie = [r["flow"] for r in observe(lab, "--from-pod", "default/tiefighter", "--to-port", "80",
                                      "--since", since) if "flow" in r]
    assert tie and {x["verdict"] for x in tie} == {"FORWARDED"}

    # the compact form reads like hubble observe
    proc = subprocess.run([PYLIUM, "-H", sock, "observe", "--verdict", "DROPPED", "--from-pod",
                           "xwing", "--last", "1"], capture_output=True, text=True, timeout=60)
    assert "default/xwing:" in proc.stdout and "-> default/deathstar:80" in proc.stdout
    assert "DROPPED" in proc.stdout
