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
    # no connection was cut for a denial
    assert not [f for f in flows if "error" in f]
    assert agent.metric("hubble_kafka_requests_total", {
        "topic": DENIED, "api_key": "metadata", "error_code": "29",
        "reporter": "server"}) >= 1
    assert agent.metric("hubble_kafka_requests_total", {
        "topic": ALLOWED, "api_key": "produce", "error_code": "0",
        "reporter": "server"}) >= 1


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
