"""The Kafka codec against hand-written byte fixtures (written from the protocol guide, not
by the codec) and, for every api key and version the proxy decodes, a round trip of a
value that names topics everywhere the layout can."""

from __future__ import annotations

import struct
import uuid

import pytest
from pylium_l7_kafka import codec
from pylium_l7_kafka.schemas import MESSAGES

from .kafka_frames import request


def s16(text: str) -> bytes:
    return struct.pack(">h", len(text)) + text.encode()


def compact(text: str) -> bytes:
    return bytes([len(text) + 1]) + text.encode()


def frame(header: bytes, body: bytes) -> bytes:
    return struct.pack(">i", len(header) + len(body)) + header + body


# hand-written fixtures ---------------------------------------------------------------------

PRODUCE_V9 = frame(
    b"\x00\x00\x00\x09\x00\x00\x00\x07" + s16("c") + b"\x00",          # header v2
    b"\x00"                                    # transactional id: compact null
    + b"\xff\xff" + b"\x00\x00\x03\xe8"        # acks -1, timeout 1000
    + b"\x02" + compact("orders")              # 1 topic
    + b"\x02" + b"\x00\x00\x00\x00" + b"\x04abc" + b"\x00"  # 1 partition, records, tags
    + b"\x00" + b"\x00")                       # topic tags, body tags

PRODUCE_V3 = frame(
    b"\x00\x00\x00\x03\x00\x00\x00\x05" + s16("c"),                     # header v1
    b"\xff\xff" + b"\x00\x01" + b"\x00\x00\x03\xe8"
    + b"\x00\x00\x00\x02" + s16("a") + b"\x00\x00\x00\x00"  # 2 topics; a: no partitions
    + s16("b") + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x02zz")

METADATA_V12 = frame(
    b"\x00\x03\x00\x0c\x00\x00\x00\x02" + s16("c") + b"\x00",
    b"\x03" + bytes(16) + compact("orders") + b"\x00"
    + bytes(16) + compact("payments") + b"\x00"
    + b"\x01" + b"\x00" + b"\x00")

METADATA_V12_ALL = frame(b"\x00\x03\x00\x0c\x00\x00\x00\x02" + s16("c") + b"\x00",
                         b"\x00" + b"\x01\x00\x00")

FETCH_V12 = frame(
    b"\x00\x01\x00\x0c\x00\x00\x00\x09" + b"\xff\xff" + b"\x00",       # null client id
    b"\xff\xff\xff\xff" + struct.pack(">iiibii", 500, 1, 1 << 20, 0, 0, -1)
    + b"\x02" + compact("orders")
    + b"\x02" + struct.pack(">iiqiqi", 0, -1, 42, -1, -1, 1 << 20) + b"\x00"
    + b"\x00"                                   # topic tags
    + b"\x01"                                   # no forgotten topics
    + compact("") + b"\x00")                    # rack, body tags

FIND_COORDINATOR_V4 = frame(
    b"\x00\x0a\x00\x04\x00\x00\x00\x01" + s16("c") + b"\x00",
    b"\x00" + b"\x02" + compact("group-1") + b"\x00")

#: a tagged field in the header and one in the body: skipped, not refused
METADATA_V12_TAGGED = frame(
    b"\x00\x03\x00\x0c\x00\x00\x00\x02" + s16("c") + b"\x01\x05\x02hi",
    b"\x02" + bytes(16) + compact("orders") + b"\x00" + b"\x01\x00" + b"\x01\x07\x01x")


def decode_frame(data: bytes) -> tuple[int, int, dict]:
    from pylium_l7_kafka.parser import parse_header

    head = parse_header(data)
    return head.api_key, head.api_version, codec.decode(
        head.api_key, "request", head.api_version, data[head.body_offset:])


@pytest.mark.parametrize("data, topics", [
    (PRODUCE_V9, ["orders"]), (PRODUCE_V3, ["a", "b"]),
    (METADATA_V12, ["orders", "payments"]), (FETCH_V12, ["orders"]),
    (FIND_COORDINATOR_V4, []), (METADATA_V12_TAGGED, ["orders"])])
def test_hand_written_frames_decode_with_their_topics(data, topics):
    key, version, value = decode_frame(data)
    assert codec.topics_in(key, "request", version, value) == topics


def test_field_values_of_fixtures():
    _, _, produce = decode_frame(PRODUCE_V9)
    assert produce["Acks"] == -1 and produce["TransactionalId"] is None
    assert produce["TopicData"][0]["PartitionData"][0]["Records"] == b"abc"
    _, _, fetch = decode_frame(FETCH_V12)
    assert fetch["Topics"][0]["Partitions"][0]["FetchOffset"] == 42
    _, _, everything = decode_frame(METADATA_V12_ALL)
    assert everything["Topics"] is None
    _, _, old = decode_frame(PRODUCE_V3)
    assert old["TopicData"][1]["PartitionData"][0]["Records"] == b"zz"


@pytest.mark.parametrize("data", [PRODUCE_V9, PRODUCE_V3, METADATA_V12, FETCH_V12,
                                  FIND_COORDINATOR_V4])
def test_every_truncation_and_trailing_byte_is_refused(data):
    for cut in range(len(data) - 1, 4, -1):
        short = struct.pack(">i", cut - 4) + data[4:cut]
        with pytest.raises((codec.Malformed, UnicodeDecodeError)):
            decode_frame(short)
    longer = struct.pack(">i", len(data) - 4 + 1) + data[4:] + b"\x00"
    with pytest.raises(codec.Malformed):
        decode_frame(longer)


def test_encoder_writes_the_fixture_bytes():
    value = {"TransactionalId": None, "Acks": -1, "TimeoutMs": 1000,
             "TopicData": [{"Name": "orders",
                            "PartitionData": [{"Index": 0, "Records": b"abc"}]}]}
    assert request(0, 9, 7, value, "c") == PRODUCE_V9


def test_tagged_fields_are_kept_through_a_rewrite():
    _, _, value = decode_frame(METADATA_V12_TAGGED)
    assert value[codec.TAGS] == b"\x01\x07\x01x"
    body = codec.encode(3, "request", 12, value)
    assert body == METADATA_V12_TAGGED[-len(body):]


def test_fetch_by_topic_id_names_unknown_topics():
    value = sample(MESSAGES[(1, "request")][3], 13, "topic")
    assert set(codec.topics_in(1, "request", 13, value)) == {None}
    value = sample(MESSAGES[(1, "request")][3], 12, "topic")
    assert None not in codec.topics_in(1, "request", 12, value)


def test_bad_lengths_and_varints():
    with pytest.raises(codec.Malformed):  # a varint of six bytes
        codec.Reader(b"\xff\xff\xff\xff\xff\x01").uvarint()
    assert codec.Reader(codec.uvarint(300)).uvarint() == 300
    huge_array = b"\x00\x00\x00\x00" + b"\x7f\xff\xff\xff"  # acks/timeout cut short
    with pytest.raises(codec.Malformed):
        codec.decode(0, "request", 3, b"\xff\xff" + b"\x00\x01" + huge_array)
    with pytest.raises(codec.Malformed):
        codec.decode(0, "request", 99, b"")


# every api key and version -----------------------------------------------------------------

def sample(fields: tuple, version: int, topic: str, depth: int = 0) -> dict:
    """A value for every present field; topic fields get `topic`, arrays two items."""
    out = {}
    for f in fields:
        name, kind, span, nullable, tagged, _, _, names_topic, sub = f
        if tagged or not span[0] <= version <= span[1]:
            continue
        out[name] = _value(kind, names_topic, sub, version, topic, depth)
    return out


def _value(kind, names_topic, sub, version, topic, depth):
    if kind == "[]":
        return [sample(sub, version, f"{topic}{i}" if names_topic else topic, depth + 1)
                for i in range(2)]
    if kind == "{}":
        return sample(sub, version, topic, depth + 1)
    if kind.startswith("[]"):
        return [_value(kind[2:], names_topic, sub, version, f"{topic}-{i}", depth)
                for i in range(2)]
    if names_topic and kind == "string":
        return topic
    return {"int8": 1, "int16": 2, "uint16": 3, "int32": 4, "int64": 5, "float64": 1.5,
            "bool": True, "uuid": uuid.UUID(int=7), "string": "s", "bytes": b"by",
            "records": b"rec"}[kind]


#: requests that name topics in every version
TOPIC_CARRYING = {0, 1, 2, 3, 8, 19, 20, 21, 23, 28, 37, 47, 61}
CASES = [(key, kind, version) for (key, kind), (_, span, _, _) in sorted(MESSAGES.items())
         for version in range(span[0], span[1] + 1)]


@pytest.mark.parametrize("key, kind, version", CASES,
                         ids=[f"{k}-{kind}-v{v}" for k, kind, v in CASES])
def test_round_trip_of_every_api_key_and_version(key, kind, version):
    value = sample(MESSAGES[(key, kind)][3], version, "topic")
    body = codec.encode(key, kind, version, value)
    assert codec.decode(key, kind, version, body) == value
    topics = codec.topics_in(key, kind, version, value)
    assert all(t is None or t.startswith("topic") for t in topics)
    if kind == "request" and key in TOPIC_CARRYING:
        assert topics, "a topic-carrying request must name its topics (or None = by id)"
    if body:
        with pytest.raises(codec.Malformed):
            codec.decode(key, kind, version, body[:-1])
