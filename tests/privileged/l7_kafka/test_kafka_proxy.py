"""Real Kafka clients (confluent-kafka/librdkafka, aiokafka, kcat) through pylium's Kafka
proxy to librdkafka's mock broker."""

from __future__ import annotations

import pytest
from pylium.policy.kafka import PortRuleKafka

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ALLOWED, DENIED = "empire-announce", "deathstar-plans"


def produce_only(topic: str) -> tuple[PortRuleKafka, ...]:
    return (PortRuleKafka(role="produce", topic=topic),)


def test_confluent_produce_role_allowed_denied_allowed(kafka_netns, agent):
    agent.apply(*produce_only(ALLOWED))
    agent.flows.clear()
    out = kafka_netns.client("confluent-produce", kafka_netns.bootstrap,
                             f"{ALLOWED},{DENIED},{ALLOWED}")
    assert [o["topic"] for o in out] == [ALLOWED, DENIED, ALLOWED]
    assert out[0] == {"topic": ALLOWED, "ok": 3, "errors": []}
    assert out[1]["ok"] == 0 and out[1]["errors"] == ["TOPIC_AUTHORIZATION_FAILED"]
    assert out[2] == {"topic": ALLOWED, "ok": 3, "errors": []}
    flows = agent.flows.kafka()
    requests = [f for f in flows if not f["is_reply"]]
    denied = [f for f in requests if f["verdict"] == "DROPPED"
              and f["l7"]["kafka"]["api_key"] != 71]  # 71: telemetry, not in the role
    assert denied and {f["l7"]["kafka"]["topic"] for f in denied} == {DENIED}
    assert {f["l7"]["kafka"]["error_code"] for f in denied} == {29}
    produced = [f for f in requests if f["l7"]["kafka"]["api_key"] == 0
                and f["verdict"] == "FORWARDED"]
    assert {f["l7"]["kafka"]["topic"] for f in produced} == {ALLOWED}
    # librdkafka negotiates flexible versions (Produce v9+, Metadata v9+: compact, tagged)
    assert min(f["l7"]["kafka"]["api_version"] for f in produced) >= 9
    assert min(f["l7"]["kafka"]["api_version"] for f in denied) >= 9
    # no connection was cut for a denial
    assert not [f for f in flows if "error" in f]
    assert agent.metric("hubble_kafka_requests_total", {
        "topic": DENIED, "api_key": "metadata", "error_code": "29",
        "reporter": "server"}) >= 1
    assert agent.metric("hubble_kafka_requests_total", {
        "topic": ALLOWED, "api_key": "produce", "error_code": "0",
        "reporter": "server"}) >= 1
    # the core's proxy metrics, under the parser's protocol
    assert agent.metric("pylium_proxy_redirects", {"protocol": "kafka"}) >= 1
    assert agent.metric("pylium_policy_l7_total", {"rule": "denied", "protocol": "kafka"}) >= 1


def metadata_open_produce_only(topic: str) -> tuple[PortRuleKafka, ...]:
    """Metadata of every topic, Produce only to `topic`: the Produce request itself is
    what the proxy denies."""
    return (PortRuleKafka(api_key="metadata"), PortRuleKafka(api_key="apiversions"),
            PortRuleKafka(api_key="initproducerid"), PortRuleKafka(api_key="produce",
                                                                   topic=topic))


@pytest.mark.parametrize("client", ["confluent", "aiokafka"])
def test_denied_produce_request_answered_29_connection_keeps_working(kafka_netns, agent,
                                                                     client):
    agent.apply(*metadata_open_produce_only(ALLOWED))
    agent.flows.clear()
    out = kafka_netns.client(f"{client}-produce", kafka_netns.bootstrap,
                             f"{ALLOWED},{DENIED},{ALLOWED}")
    assert [o["topic"] for o in out] == [ALLOWED, DENIED, ALLOWED]
    assert out[0]["ok"] == 3 and out[2]["ok"] == 3, out
    assert out[1]["ok"] == 0, out
    assert out[1]["errors"] == (["TOPIC_AUTHORIZATION_FAILED"] if client == "confluent"
                                else ["TopicAuthorizationFailedError"]), out
    requests = [f for f in agent.flows.kafka() if not f["is_reply"]]
    denied = [f for f in requests if f["verdict"] == "DROPPED"
              and f["l7"]["kafka"]["api_key"] == 0]
    assert denied and {f["l7"]["kafka"]["topic"] for f in denied} == {DENIED}
    last = requests.index(denied[-1])
    assert any(f["l7"]["kafka"]["api_key"] == 0 and f["verdict"] == "FORWARDED"
               and f["sport"] == denied[-1]["sport"] for f in requests[last + 1:])


def consume_only(topic: str) -> tuple[PortRuleKafka, ...]:
    return (PortRuleKafka(role="consume", topic=topic),)


@pytest.mark.parametrize("client", ["confluent", "aiokafka"])
def test_consume_role_allowed_and_denied(kafka_netns, agent, client):
    topic = f"{ALLOWED}-{client}"
    agent.apply(PortRuleKafka(role="produce"))  # seed the topic through the proxy
    seeded = kafka_netns.client(f"{client}-produce", kafka_netns.bootstrap,
                                f"{topic},{DENIED}", "4")
    assert [s["ok"] for s in seeded] == [4, 4], seeded
    agent.apply(*consume_only(topic))
    agent.flows.clear()
    out = kafka_netns.client(f"{client}-consume", kafka_netns.bootstrap, topic, "4")
    assert sorted(out[0]["values"]) == [f"{topic}-{i}" for i in range(4)], out
    keys = {f["l7"]["kafka"]["api_key"] for f in agent.flows.kafka()
            if not f["is_reply"] and f["verdict"] == "FORWARDED"}
    assert {1, 3, 10, 11, 14} <= keys, keys  # fetch, metadata, coordinator, join, sync
    # a topic the consume rule does not name (metadata of every topic allowed, so the
    # group's offset and fetch requests are what gets denied): an authorization error
    agent.apply(*consume_only(topic), PortRuleKafka(api_key="metadata"))
    agent.flows.clear()
    out = kafka_netns.client(f"{client}-consume", kafka_netns.bootstrap, DENIED, "1")
    assert out[0]["values"] == []
    assert "TOPIC_AUTHORIZATION_FAILED" in out[0]["error"] or \
        "TopicAuthorizationFailedError" in out[0]["error"], out
    denied = [f for f in agent.flows.kafka() if not f["is_reply"]
              and f["verdict"] == "DROPPED" and f["l7"]["kafka"]["api_key"] != 71]
    assert denied and {f["l7"]["kafka"]["topic"] for f in denied} == {DENIED}


def test_kcat_produce_and_consume(kafka_netns, agent):
    topic = f"{ALLOWED}-kcat"
    agent.apply(PortRuleKafka(role="produce", topic=topic),
                PortRuleKafka(role="consume", topic=topic))
    done = kafka_netns.kcat("-P", "-t", topic, stdin="one\ntwo\nthree\n")
    assert done.returncode == 0, done.stderr
    got = kafka_netns.kcat("-C", "-t", topic, "-o", "beginning", "-e", "-c", "3")
    assert got.returncode == 0, got.stderr
    assert sorted(got.stdout.split()) == ["one", "three", "two"]  # across partitions
    denied = kafka_netns.kcat("-P", "-t", DENIED, stdin="x\n")
    assert denied.returncode != 0 or "authorization" in denied.stderr.lower()
    assert "authoriz" in denied.stderr.lower(), denied.stderr


def test_produce_frame_larger_than_the_read_ahead(kafka_netns, agent):
    """A 3 MB Produce request is buffered whole and judged (the proxy's read-ahead is 1 MiB:
    the parser's `max_buffer` keeps reading from pausing on it)."""
    agent.apply(*produce_only(ALLOWED))
    agent.flows.clear()
    [out] = kafka_netns.client("confluent-big", kafka_netns.bootstrap, ALLOWED, "3000000",
                               timeout=150)
    assert out["results"] == [None], out
    [out] = kafka_netns.client("confluent-big", kafka_netns.bootstrap, DENIED, "3000000",
                               timeout=150)
    assert out["results"] == ["TOPIC_AUTHORIZATION_FAILED"], out


RAW_CLIENT = """
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=20)
s.sendall(bytes.fromhex(sys.argv[2]))
print("closed" if s.recv(4096) == b"" else "answered")
"""


def test_denied_request_with_no_answer_is_a_denial_and_a_bad_frame_a_parse_error(
        kafka_netns, agent):
    """A request the proxy denies but cannot answer (ConsumerGroupHeartbeat, api key 68) is
    counted `denied`; a frame that does not decode, `parse_errors`; both close the
    connection, and `received` stays the sum of forwarded, denied and parse errors."""
    import struct
    import sys
    import time

    from pylium_l7_kafka import codec

    agent.apply(*produce_only(ALLOWED))
    agent.flows.clear()

    def counts() -> dict[str, float]:
        return {rule: agent.metric("pylium_policy_l7_total",
                                   {"rule": rule, "protocol": "kafka"})
                for rule in ("received", "forwarded", "denied", "parse_errors")}

    def send(frame: bytes, expect: dict[str, float]) -> None:
        before = counts()
        out = kafka_netns.run(sys.executable, "-c", RAW_CLIENT, kafka_netns.bootstrap,
                              frame.hex())
        assert out.stdout.strip() == "closed", out
        deadline = time.monotonic() + 20
        while True:  # flow records reach the agent in batches
            delta = {k: v - before[k] for k, v in counts().items()}
            if delta == expect or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert delta == expect, delta

    send(codec.request_frame(68, 0, 5, "raw", b"\x00"),
         {"received": 1, "forwarded": 0, "denied": 1, "parse_errors": 0})
    [record] = [f for f in agent.flows.kafka() if f["l7"]["kafka"].get("api_key") == 68]
    assert record["verdict"] == "DROPPED" and not record["is_reply"]
    send(struct.pack(">i", 3) + b"abc",
         {"received": 1, "forwarded": 0, "denied": 0, "parse_errors": 1})
    total = counts()
    assert total["received"] == total["forwarded"] + total["denied"] + total["parse_errors"]
