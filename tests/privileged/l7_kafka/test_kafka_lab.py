"""Cilium's Kafka example end to end through pylium's real datapath: a lab node whose agent
runs the `kafka` L7 parser (`l7_parsers: [kafka]`), pods for the broker and two clients,
`examples/kafka-empire.yaml` imported over the API. The broker pod's ingress redirect sends
client connections to the Kafka proxy on the node; its upstream carries the client's
identity.

No Kafka broker can run here: librdkafka's mock cluster stands in, inside the broker pod.
It binds and advertises 127.0.0.1:P, so socat bridges (not part of pylium) carry
`127.0.0.1:P` in each client pod to `broker-pod:9092`, and `:9092` in the broker pod to the
mock: the hop in between is real pod-to-pod traffic the datapath redirects."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..endpoint.eplab import api, import_policy, make_lab
from .conftest import CLIENTS

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

POLICY = Path(__file__).resolve().parents[3] / "plugins/l7_kafka/examples/kafka-empire.yaml"
PODS = ("kafka", "empire-hq", "empire-outpost")


def observe(lab, *args: str) -> list[dict]:
    proc = subprocess.run([str(Path(sys.executable).with_name("pylium")), "-H",
                           lab.node()["socket"], "observe", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["flow"] for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lab():
    lab = None
    procs: list[subprocess.Popen] = []
    try:
        lab = make_lab(l7_parsers=["kafka"])
        for name in PODS:
            lab.add_pod(name, {"app": name})
        ips = {p["name"]: p["ip"] for p in lab.status()["pods"]}
        mock = subprocess.Popen(lab.exec_argv("kafka", [sys.executable, str(CLIENTS), "mock",
                                                        "3600"]),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(mock)
        lab.bootstrap = mock.stdout.readline().strip()
        port = lab.bootstrap.rsplit(":", 1)[1]
        procs.append(subprocess.Popen(lab.exec_argv("kafka", [
            "socat", "TCP-LISTEN:9092,fork,reuseaddr", f"TCP:127.0.0.1:{port}"])))
        for client in PODS[1:]:
            procs.append(subprocess.Popen(lab.exec_argv(client, [
                "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                f"TCP:{ips['kafka']}:9092"])))
        time.sleep(0.5)
        yield lab
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if lab is not None:
            lab.down()


def trace(lab, src: str, api_key: str, topic: str) -> str:
    proc = subprocess.run([str(Path(sys.executable).with_name("pylium")), "-H",
                           lab.node()["socket"], "policy", "trace", "--src", f"app={src}",
                           "--dst", "app=kafka", "--dport", "9092", "--kafka-api-key", api_key,
                           "--kafka-topic", topic, "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["verdict"]


def client(lab, pod: str, *args: str) -> list[dict]:
    done = lab.exec(pod, [sys.executable, str(CLIENTS), *args], timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_empire_policy_through_the_datapath_redirect(lab):
    # before any policy: no redirect, the broker is reachable directly
    assert client(lab, "empire-hq", "confluent-produce", lab.bootstrap,
                  "empire-announce,deathstar-plans", "2") == [
        {"topic": "empire-announce", "ok": 2, "errors": []},
        {"topic": "deathstar-plans", "ok": 2, "errors": []}]
    import_policy(lab, POLICY.read_text())
    broker = next(ep for ep in api(lab).get("/v1/endpoint") if ep["name"] == "kafka")
    redirects = [e for e in api(lab).get(f"/v1/bpf/policy/{broker['id']}")["entries"]
                 if e["verdict"] == "redirect"]
    assert redirects and {e["proxy_port"] for e in redirects} == {10092}, redirects
    # the headquarters produces to both topics, through the proxy
    assert [o["ok"] for o in client(lab, "empire-hq", "confluent-produce", lab.bootstrap,
                                    "empire-announce,deathstar-plans", "2")] == [2, 2]
    # an outpost consumes the announcements...
    [got] = client(lab, "empire-outpost", "confluent-consume", lab.bootstrap,
                   "empire-announce", "4")
    assert sorted(got["values"]) == sorted(
        [f"empire-announce-{i}" for i in range(2)] * 2), got
    # ...but may not produce to them: the broker never sees that Produce (a plain
    # producer: an idempotent one is already refused its producer id, InitProducerId not
    # being part of `consume`)
    [denied] = client(lab, "empire-outpost", "confluent-produce", lab.bootstrap,
                      "empire-announce", "1", "plain")
    assert denied["ok"] == 0 and denied["errors"] == ["TOPIC_AUTHORIZATION_FAILED"], denied
    refused = lab.exec("empire-outpost", [sys.executable, str(CLIENTS), "confluent-produce",
                                          lab.bootstrap, "empire-announce", "1"], timeout=90)
    assert refused.returncode != 0 and "CLUSTER_AUTHORIZATION_FAILED" in refused.stderr
    flows = observe(lab, "--protocol", "kafka", "--last", "1000")
    kafka = [(f["verdict"], f["l7"]["kafka"]) for f in flows if f["l7"]["type"] == "REQUEST"]
    assert ("DROPPED", {"api_key": 0, "topic": "empire-announce"}) in [
        (v, {"api_key": k.get("api_key"), "topic": k.get("topic")}) for v, k in kafka]
    assert any(v == "FORWARDED" and k.get("api_key") == 1 for v, k in kafka)  # a Fetch
    dropped = next(f for f in flows if f["verdict"] == "DROPPED"
                   and f["l7"]["kafka"].get("api_key") == 0)
    assert dropped["source"]["labels"] and any(
        "empire-outpost" in label for label in dropped["source"]["labels"])
    # the agent's trace answers what the proxy did
    assert trace(lab, "empire-outpost", "produce", "empire-announce") == "denied"
    assert trace(lab, "empire-outpost", "fetch", "empire-announce") == "redirected"
