"""The Kafka connection parser: verdicts, local answers (right version, correlation id,
error 29 per topic/partition), response order, partial Metadata, ApiVersions capping,
closing on frames it cannot decode."""

from __future__ import annotations

import struct

from prometheus_client import CollectorRegistry
from pylium.l7.backend import ProxyMetrics
from pylium.policy.kafka import PortRuleKafka
from pylium_l7_kafka import codec
from pylium_l7_kafka.parser import KafkaParserFactory, max_version

from .kafka_frames import Engine, read_response, request, split_frames

PRODUCE_A = {"Acks": -1, "TimeoutMs": 1000, "TopicData": [
    {"Name": "a", "PartitionData": [{"Index": 0, "Records": b"x"},
                                    {"Index": 3, "Records": b"y"}]}]}


def produce(*topics: str, acks: int = -1) -> dict:
    return {"Acks": acks, "TimeoutMs": 1000, "TopicData": [
        {"Name": t, "PartitionData": [{"Index": 0, "Records": b"r"}]} for t in topics]}


def test_allowed_request_passes_unchanged_and_its_response_too():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    sent = e.request(0, 9, 11, PRODUCE_A)
    assert bytes(e.to_broker) == sent and not e.to_client
    answer = e.respond(0, 9, 11, {"Responses": [{"Name": "a", "PartitionResponses": [
        {"Index": 0, "ErrorCode": 0}]}]})
    assert bytes(e.to_client) == answer
    kinds = [(f["verdict"], f["l7"]["type"]) for f in e.flows]
    assert kinds == [("FORWARDED", "REQUEST"), ("FORWARDED", "RESPONSE")]
    assert e.flows[0]["l7"]["kafka"] == {"api_key": 0, "api_version": 9,
                                         "correlation_id": 11, "error_code": 0, "topic": "a"}


def test_denied_produce_answered_29_per_partition_at_every_version():
    for version in range(0, max_version(0) + 1):
        e = Engine(PortRuleKafka(role="produce", topic="b"))
        e.request(0, version, 100 + version, PRODUCE_A)
        assert not e.to_broker and not e.closed
        corr, value = read_response(bytes(e.to_client), 0, version)
        assert corr == 100 + version
        [topic] = value["Responses"]
        assert topic["Name"] == "a"
        assert [(p["Index"], p["ErrorCode"]) for p in topic["PartitionResponses"]] == \
            [(0, 29), (3, 29)]


def test_denied_answers_decode_for_every_topic_request_and_version():
    """Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, CreateTopics, DeleteTopics,
    DeleteRecords, OffsetForLeaderEpoch, TxnOffsetCommit, ...: the local answer is a
    well-formed response of that version, error 29 wherever a topic is named."""
    from .test_codec import MESSAGES, sample

    for key in (0, 1, 2, 3, 8, 9, 19, 20, 21, 23, 24, 28, 37, 47, 61):
        span = MESSAGES[(key, "request")][1]
        for version in range(span[0], min(span[1], max_version(key)) + 1):
            e = Engine(PortRuleKafka(topic="other"))
            value = sample(MESSAGES[(key, "request")][3], version, "topic")
            e.request(key, version, 7, value)
            assert not e.to_broker and not e.closed, (key, version)
            corr, answer = read_response(bytes(e.to_client), key, version)
            assert corr == 7
            codes = _codes(answer)
            assert codes and set(codes) <= {0, 29} and 29 in codes, (key, version, answer)


def _codes(value) -> list[int]:
    if isinstance(value, dict):
        out = [v for k, v in value.items() if k in ("ErrorCode", "PartitionErrorCode")]
        for v in value.values():
            out += _codes(v)
        return out
    if isinstance(value, list):
        return [c for v in value for c in _codes(v)]
    return []


def test_a_request_naming_several_topics_needs_all_of_them():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(0, 9, 1, produce("a", "b"))
    assert not e.to_broker
    _, value = read_response(bytes(e.to_client), 0, 9)
    assert {t["Name"] for t in value["Responses"]} == {"a", "b"}
    e2 = Engine(PortRuleKafka(role="produce", topic="a"), PortRuleKafka(role="produce",
                                                                        topic="b"))
    e2.request(0, 9, 1, produce("a", "b"))
    assert e2.to_broker


def test_local_answer_waits_for_earlier_responses():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(0, 9, 1, produce("a"))
    e.request(0, 9, 2, produce("b"))
    assert not e.to_client  # the broker still owes the answer to 1
    e.respond(0, 9, 1, {"Responses": []})
    frames = split_frames(bytes(e.to_client))
    assert [read_response(f, 0, 9)[0] for f in frames] == [1, 2]


def test_acks_zero_denied_gets_no_answer():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(0, 9, 1, produce("b", acks=0))
    assert not e.to_client and not e.to_broker and not e.closed
    e.request(0, 9, 2, produce("a", acks=0))  # and an allowed acks=0 expects nothing back
    e.request(0, 9, 3, produce("b"))
    assert read_response(bytes(e.to_client), 0, 9)[0] == 3


def test_metadata_with_a_denied_topic_is_forwarded_for_the_allowed_ones():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(3, 12, 5, {"Topics": [{"Name": "a"}, {"Name": "b"}],
                         "AllowAutoTopicCreation": True})
    [forwarded] = split_frames(bytes(e.to_broker))
    from .test_codec import decode_frame

    assert codec.topics_in(3, "request", 12, decode_frame(forwarded)[2]) == ["a"]
    e.respond(3, 12, 5, {"Brokers": [{"NodeId": 1, "Host": "h", "Port": 9092}],
                         "Topics": [{"Name": "a", "ErrorCode": 0, "Partitions": []}]})
    corr, value = read_response(bytes(e.to_client), 3, 12)
    assert corr == 5
    assert [(t["Name"], t["ErrorCode"]) for t in value["Topics"]] == [("a", 0), ("b", 29)]
    assert value["Brokers"][0]["Host"] == "h"


def test_metadata_for_every_topic_needs_a_topicless_rule():
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(3, 12, 5, {"Topics": None})
    assert not e.to_broker and e.to_client
    e = Engine(PortRuleKafka(role="produce"))
    e.request(3, 12, 5, {"Topics": None})
    assert e.to_broker
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(3, 0, 5, {"Topics": []})  # v0: empty = every topic
    assert not e.to_broker


def test_non_topic_requests_follow_the_role():
    e = Engine(PortRuleKafka(role="consume", topic="a"))
    e.request(10, 4, 1, {"KeyType": 0, "CoordinatorKeys": ["g"]})
    e.request(12, 4, 2, {"GroupId": "g"})
    assert len(split_frames(bytes(e.to_broker))) == 2
    e.request(22, 4, 3, {"TransactionalId": None})  # InitProducerId: not a consume key
    assert not e.to_client  # queued behind the two the broker owes
    e.respond(10, 4, 1, {})
    e.respond(12, 4, 2, {})
    frames = split_frames(bytes(e.to_client))
    corr, value = read_response(frames[-1], 22, 4)
    assert corr == 3 and value["ErrorCode"] == 31


def test_api_versions_answer_is_capped_at_what_the_parser_decodes():
    e = Engine(allow_all=True)
    e.request(18, 3, 1, {"ClientSoftwareName": "t", "ClientSoftwareVersion": "1"})
    e.respond(18, 3, 1, {"ErrorCode": 0, "ApiKeys": [
        {"ApiKey": 0, "MinVersion": 0, "MaxVersion": 99},
        {"ApiKey": 1, "MinVersion": 4, "MaxVersion": 17},
        {"ApiKey": 68, "MinVersion": 0, "MaxVersion": 5}]})
    _, value = read_response(bytes(e.to_client), 18, 3)
    got = {k["ApiKey"]: k["MaxVersion"] for k in value["ApiKeys"]}
    assert got == {0: max_version(0), 1: 12, 68: 5}


def test_frames_that_do_not_decode_close_the_connection_unforwarded():
    good = request(0, 9, 1, PRODUCE_A)
    short_by_one = struct.pack(">i", len(good) - 5) + good[4:]  # body cut, a byte left over
    header = b"\x00\x03\x00\x0c\x00\x00\x00\x01\x00\x01c\x00"
    for data in (struct.pack(">i", 3) + b"abc",                      # shorter than a header
                 struct.pack(">i", codec.MAX_FRAME + 1),             # oversized
                 short_by_one,
                 good[:6] + b"\x00\x63" + good[8:],                  # Produce v99
                 struct.pack(">i", len(header) + 3) + header + b"\x05\x05\x05"):
        e = Engine(allow_all=True)
        e.feed(False, data)
        assert e.closed and not e.to_broker and not e.to_client, data[:16]
        assert e.flows[-1]["verdict"] == "DROPPED" and e.flows[-1]["error"]


def test_unknown_api_key_needs_a_rule_without_topic():
    frame = codec.request_frame(68, 0, 1, "c", b"\x00")  # ConsumerGroupHeartbeat (not parsed)
    e = Engine(PortRuleKafka(role="consume", topic="a"))
    e.feed(False, frame)
    assert not e.to_broker and e.closed  # denied, and no answer known: closed
    e = Engine(allow_all=True)
    e.feed(False, frame)
    assert bytes(e.to_broker) == frame


def _policy_l7(flows: list[dict]) -> dict[str, float]:
    """The records as the core's proxy metrics count them (`pylium_policy_l7_total`)."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    for flow in flows:
        metrics.observe("kafka", flow)
    return {rule: registry.get_sample_value("pylium_policy_l7_total",
                                            {"rule": rule, "protocol": "kafka"}) or 0
            for rule in ("received", "forwarded", "denied", "parse_errors")}


def test_denied_without_a_known_answer_counts_as_denied_not_as_a_parse_error():
    frame = codec.request_frame(68, 0, 1, "c", b"\x00")  # ConsumerGroupHeartbeat
    e = Engine(PortRuleKafka(role="consume", topic="a"))
    e.feed(False, frame)
    assert e.closed and not e.to_broker and not e.to_client
    [record] = e.flows
    assert record["verdict"] == "DROPPED" and "error" not in record
    assert record["l7"]["type"] == "REQUEST" and record["l7"]["kafka"]["api_key"] == 68
    assert _policy_l7(e.flows) == {"received": 1, "forwarded": 0, "denied": 1,
                                   "parse_errors": 0}


def test_every_request_outcome_counts_once():
    """received = forwarded + denied + parse_errors over each way a request can end:
    allowed, denied and answered, denied with acks=0 (no answer owed), denied with no
    answer known (closed), and a frame that does not decode (a parse error, closed)."""
    flows: list[dict] = []
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.request(0, 9, 1, produce("a"))
    e.request(0, 9, 2, produce("b"))
    e.request(0, 9, 3, produce("b", acks=0))
    flows += e.flows
    e = Engine(PortRuleKafka(role="produce", topic="a"))
    e.feed(False, codec.request_frame(68, 0, 4, "c", b"\x00"))
    flows += e.flows
    e = Engine(allow_all=True)
    e.feed(False, struct.pack(">i", 3) + b"abc")
    assert e.closed and e.flows[-1]["error"]
    flows += e.flows
    counts = _policy_l7(flows)
    assert counts == {"received": 5, "forwarded": 1, "denied": 3, "parse_errors": 1}
    assert counts["received"] == counts["forwarded"] + counts["denied"] \
        + counts["parse_errors"]


def test_response_out_of_order_closes():
    e = Engine(allow_all=True)
    e.request(12, 4, 1, {"GroupId": "g"})
    e.respond(12, 4, 2, {})
    assert e.closed and not e.to_client


def test_client_id_and_version_rules():
    e = Engine(PortRuleKafka(api_key="produce", api_version="9", client_id="me", topic="a"))
    e.request(0, 9, 1, produce("a"), client_id="me")
    e.request(0, 8, 2, produce("a"), client_id="me")
    e.request(0, 9, 3, produce("a"), client_id="you")
    assert len(split_frames(bytes(e.to_broker))) == 1


def test_factory_rules_from_json():
    factory = KafkaParserFactory()
    rules = factory.rules_from_json([{"role": "produce", "topic": "a"}])
    assert rules == (PortRuleKafka(role="produce", topic="a"),)
    import pytest

    with pytest.raises(ValueError):
        factory.rules_from_json([{"role": "admin"}])
    with pytest.raises(ValueError):
        factory.rules_from_json([{"topic": "a", "group": "g"}])


def test_backend_judge_agrees_with_the_proxy():
    from pylium.api import L7Request
    from pylium.policy.resolve import L7Grant
    from pylium_l7_kafka.backend import L7Kafka

    backend = L7Kafka.__new__(L7Kafka)
    grants = [L7Grant("r", "kafka", (PortRuleKafka(role="consume", topic="a"),))]
    allowed = backend.judge(grants, L7Request("kafka", {"api_key": "fetch", "topics": ["a"]}))
    assert allowed.allowed and "r" in allowed.reason
    denied = backend.judge(grants, L7Request("kafka", {"api_key": 1, "topic": "b"}))
    assert not denied.allowed and "b" in denied.reason
