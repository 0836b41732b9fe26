"""Kafka L7 flows through the flow layer: Hubble's `l7.kafka` JSON, `observe --protocol
kafka`, the compact line; and the Hubble metrics the backend derives from them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from pylium.flow.component import FlowObserver
from pylium.flow.filters import parse_query
from pylium.flow.model import compact_line, to_response
from pylium_l7_kafka.backend import KafkaMetrics

DENIED = {"type": "REQUEST", "kafka": {"api_key": 0, "api_version": 9, "correlation_id": 8,
                                       "error_code": 29, "topic": "deathstar-plans"}}


def test_kafka_flow_is_hubble_l7_and_filterable():
    obs = FlowObserver("n", lambda *_: None)
    obs.record_l7(src_ip="10.200.0.11", dst_ip="10.200.0.10", sport=40000, dport=9092,
                  src_identity=1002, dst_identity=1001, ep_id=11, verdict="DROPPED", l7=DENIED)
    obs.record_l7(src_ip="10.200.0.11", dst_ip="10.200.0.10", sport=40000, dport=80,
                  src_identity=1002, dst_identity=1001, ep_id=11, verdict="FORWARDED",
                  l7={"type": "REQUEST", "http": {"method": "GET", "url": "/"}})
    records = obs.ring.snapshot()
    (flow,) = parse_query({"protocol": ["kafka"]}).select(records)
    f = to_response(flow)["flow"]
    assert f["Type"] == "L7" and f["l7"]["kafka"]["topic"] == "deathstar-plans"
    assert f["l7"]["kafka"]["error_code"] == 29
    assert compact_line(to_response(flow)).endswith(
        "kafka-request DROPPED (Kafka request produce correlation id 8 topic "
        "'deathstar-plans' error 29)")


def test_hubble_kafka_metrics_count_responses_per_topic():
    registry = CollectorRegistry()
    metrics = KafkaMetrics.of(registry)
    assert KafkaMetrics.of(registry) is metrics
    metrics.observe({"direction": 0, "l7": {**DENIED, "type": "REQUEST"}})  # not counted
    metrics.observe({"direction": 0, "l7": {"type": "RESPONSE", "latency_ns": 2_000_000,
                                            "kafka": {**DENIED["kafka"], "topic": "a",
                                                      "topics": ["a", "b"]}}})
    for topic in ("a", "b"):
        assert registry.get_sample_value("hubble_kafka_requests_total", {
            "topic": topic, "api_key": "produce", "error_code": "29",
            "reporter": "server"}) == 1
    assert registry.get_sample_value("hubble_kafka_request_duration_seconds_count", {
        "topic": "a", "api_key": "produce", "reporter": "server"}) == 1
