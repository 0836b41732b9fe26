"""Hypothesis against the Kafka frame parser: random bytes, valid frames of every api key
and version, truncated, oversized and mutated ones, in random chunks. The parser must never
crash or spin, and nothing reaches the broker unless it is a frame that decodes.

Default: 1,000 examples of 100 frames each = 100,000 frames (`KAFKA_FUZZ_EXAMPLES` to
change; about a minute of CPU)."""

from __future__ import annotations

import functools
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pylium.policy.kafka import PortRuleKafka
from pylium_l7_kafka import codec
from pylium_l7_kafka.parser import parse_header

from .kafka_frames import Engine, request
from .test_codec import CASES, sample

EXAMPLES = int(os.environ.get("KAFKA_FUZZ_EXAMPLES", "1000"))
FRAMES = 100
REQUESTS = [(k, v) for k, kind, v in CASES if kind == "request"]
TOPICS = ("topic0", "topic1", "topic")


@functools.cache
def valid_frame(key: int, version: int, topic: str, client_id: str | None) -> bytes:
    value = sample(codec.message(key, "request")[3], version, topic)
    return request(key, version, 0, value, client_id)


@st.composite
def frame(draw) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:  # random bytes
        return draw(st.binary(max_size=64))
    key, version = draw(st.sampled_from(REQUESTS))
    data = bytearray(valid_frame(key, version, draw(st.sampled_from(TOPICS)),
                                 draw(st.sampled_from(["c", None, ""]))))
    data[8:12] = struct.pack(">i", draw(st.integers(-2**31, 2**31 - 1)))
    if kind == 1:  # truncated (the size still claims the whole frame)
        return bytes(data[:draw(st.integers(0, max(0, len(data) - 1)))])
    if kind == 2:  # oversized or negative size
        data[0:4] = struct.pack(">i", draw(st.sampled_from(
            [codec.MAX_FRAME + 1, 2**31 - 1, -1, -2**31, 0, 7])))
        return bytes(data)
    if kind == 3:  # a few bytes flipped
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    return bytes(data)  # valid


def forwarded_frames_decode(data: bytes) -> None:
    pos = 0
    while pos < len(data):
        size = struct.unpack_from(">i", data, pos)[0]
        whole = data[pos:pos + 4 + size]
        assert len(whole) == 4 + size, "a partial frame went to the broker"
        head = parse_header(whole)
        if codec.message(head.api_key, "request") is not None:
            codec.decode(head.api_key, "request", head.api_version, whole[head.body_offset:])
        pos += 4 + size


@pytest.mark.slow
@pytest.mark.timeout(1800)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(frame(), min_size=FRAMES, max_size=FRAMES), st.integers(1, 4096),
       st.booleans())
def test_parser_never_crashes_spins_or_forwards_an_unparsed_frame(frames, chunk, open_policy):
    rules = (PortRuleKafka(),) if open_policy else (PortRuleKafka(role="produce",
                                                                   topic="topic0"),)
    e = Engine(*rules)
    stream = b"".join(frames)
    for i in range(0, len(stream), chunk):
        e.feed(False, stream[i:i + chunk])
        if e.closed:
            break
    forwarded_frames_decode(bytes(e.to_broker))
    if e.to_client:  # local answers are whole response frames
        pos = 0
        out = bytes(e.to_client)
        while pos < len(out):
            pos += 4 + struct.unpack_from(">i", out, pos)[0]
        assert pos == len(out)
