"""Kafka inside the L7 proxy process: one `KafkaConnection` per redirected connection.

Requests: a whole frame is read (size-prefixed, at most `codec.MAX_FRAME`), its header and
body decoded strictly from the protocol tables, and judged. Allowed -> passed unchanged;
denied -> dropped and answered in the broker's place (`responses.denial`), or, for a request
no answer is known for, dropped and the connection closed (still a denial in the records);
a frame that does not decode -> the connection is closed (it never reaches the broker), the
only request record that carries an `error` (the core counts those under `parse_errors`).

Responses come back in request order; the proxy keeps that order: a local answer waits
until the responses of the requests before it have been passed. Responses are streamed
(a large Fetch is one PASS) except ApiVersions — whose version ranges are capped at what
this parser decodes, so clients never negotiate a version the proxy would have to refuse —
and a Metadata request that named denied topics next to allowed ones, whose response gets
the denied topics added back with TOPIC_AUTHORIZATION_FAILED."""

from __future__ import annotations

import collections
import struct
import time
from collections.abc import Mapping
from typing import Any

import attrs
from pylium.l7.parser import (
    CLOSE,
    DROP,
    INJECT,
    INSERT,
    MORE,
    PASS,
    ConnectionInfo,
    ConnectionParser,
    Emit,
    GrantsNow,
    Op,
    ParserFactory,
)
from pylium.policy.kafka import PortRuleKafka

from pylium_l7_kafka import codec, responses
from pylium_l7_kafka.rules import Request, judge, rule_from_json

_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")
PRODUCE, FETCH, METADATA, API_VERSIONS = 0, 1, 3, 18
#: Fetch v13+ names topics by id only: the proxy advertises at most v12 so every fetched
#: topic has a name policy can match
VERSION_CAPS = {FETCH: 12}
#: responses at most this large are decoded for their error code (larger ones stream)
DECODE_RESPONSE_MAX = 64 * 1024


def max_version(api_key: int) -> int | None:
    found = codec.message(api_key, "request")
    if found is None or codec.message(api_key, "response") is None:
        return None
    return min(found[1][1], VERSION_CAPS.get(api_key, found[1][1]))


@attrs.define
class Pending:
    """A response the client is owed, in request order."""

    correlation_id: int
    api_key: int
    api_version: int
    topics: tuple[str, ...] = ()
    started_ns: int = 0
    #: the frame the proxy answers with (None = the broker's response)
    local: bytes | None = None
    #: Metadata topics denied while others were forwarded: added to the response
    denied_topics: tuple[str, ...] = ()


@attrs.define
class Header:
    size: int  # the whole frame, size prefix included
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body_offset: int


def parse_header(frame: bytes | memoryview) -> Header:
    """`frame` is one whole request (size prefix included)."""
    r = codec.Reader(frame, 4)
    api_key = r.scalar(_I16)
    version = r.scalar(_I16)
    correlation_id = r.scalar(_I32)
    n = r.scalar(_I16)
    if n < -1:
        raise codec.Malformed(f"bad client id length {n}")
    client_id = None if n == -1 else r.take(n).decode("utf-8", "replace")
    if codec.is_flexible(api_key, version):
        codec.read_tags(r)
    return Header(len(frame), api_key, version, correlation_id, client_id, r.pos)


def flow_l7(pending: Pending | Header, kind: str, error_code: int = 0,
            latency_ns: int = 0) -> dict[str, Any]:
    topics = list(pending.topics) if isinstance(pending, Pending) else []
    l7: dict[str, Any] = {"type": kind, "kafka": {
        "api_key": pending.api_key, "api_version": pending.api_version,
        "correlation_id": pending.correlation_id, "error_code": error_code,
        "topic": topics[0] if topics else ""}}
    if len(topics) > 1:
        l7["kafka"]["topics"] = topics
    if latency_ns:
        l7["latency_ns"] = latency_ns
    return l7


class KafkaConnection(ConnectionParser):
    def __init__(self, info: ConnectionInfo, grants: GrantsNow, emit: Emit):
        self.info = info
        self.grants = grants
        self.emit = emit
        self.pending: collections.deque[Pending] = collections.deque()
        self.resp_state = "head"  # head | finish
        self.closed = False

    def on_data(self, reply: bool, data: bytes | memoryview, end_stream: bool) -> list[Op]:
        if self.closed:
            return [DROP(len(data))] if data else [MORE]
        return self._response(data) if reply else self._request(data)

    # requests -----------------------------------------------------------------------------
    def _request(self, data: bytes | memoryview) -> list[Op]:
        if len(data) < 4:
            return [MORE]
        size = _I32.unpack_from(data, 0)[0]
        if size < codec.HEADER_FIXED + 2 or size > codec.MAX_FRAME:
            return self._bad(len(data), f"bad request size {size}")
        if len(data) < 4 + size:
            return [MORE]
        frame = bytes(data[:4 + size])
        try:
            head = parse_header(frame)
            request_version = codec.message(head.api_key, "request")
            if request_version is None:
                value: dict[str, Any] = {}
                topics: tuple[str, ...] | None = None  # cannot be known: topic-less rules
            else:
                value = codec.decode(head.api_key, "request", head.api_version,
                                     memoryview(frame)[head.body_offset:])
                named = codec.topics_in(head.api_key, "request", head.api_version, value)
                if head.api_key == METADATA and head.api_version == 0 and not named:
                    topics = None  # Metadata v0: an empty list asks for every topic
                elif any(t is None for t in named):
                    topics = None  # by id only, or "every topic": topic-less rules only
                else:
                    topics = tuple(named)
        except codec.Malformed as exc:
            return self._bad(len(data), str(exc))
        request = Request(head.api_key, head.api_version, head.client_id, topics)
        verdict = judge(self.grants(), request)
        now = time.monotonic_ns()
        shown = tuple(dict.fromkeys(topics or ()))
        pending = Pending(head.correlation_id, head.api_key, head.api_version, shown, now)
        expects_reply = not (head.api_key == PRODUCE and value.get("Acks") == 0)
        if not verdict.allowed and head.api_key == METADATA and topics \
                and len(verdict.denied_topics) < len(shown):
            return self._partial_metadata(head, value, pending, verdict.denied_topics)
        if verdict.allowed:
            self.emit({"verdict": "FORWARDED", "rule": verdict.rule,
                       "l7": flow_l7(pending, "REQUEST")})
            if expects_reply:
                self.pending.append(pending)
            return [PASS(head.size)]
        if not responses.can_answer(head.api_key, head.api_version):
            # judged and denied (a denial, not a parse error: no "error" key); no answer in
            # the broker's place is known for it, so the connection is closed instead
            self.emit({"verdict": "DROPPED", "l7": flow_l7(pending, "REQUEST")})
            self.closed = True
            return [DROP(len(data)), CLOSE]
        local, code = responses.denial(head.api_key, head.api_version, head.correlation_id,
                                       value)
        self.emit({"verdict": "DROPPED", "l7": flow_l7(pending, "REQUEST", code)})
        if not expects_reply:
            return [DROP(head.size)]
        pending.local = local
        self.emit({"verdict": "DROPPED", "is_reply": True,
                   "l7": flow_l7(pending, "RESPONSE", code)})
        if self.pending:
            self.pending.append(pending)
            return [DROP(head.size)]
        return [DROP(head.size), INJECT(local)]

    def _partial_metadata(self, head: Header, value: dict[str, Any], pending: Pending,
                          denied: tuple[str, ...]) -> list[Op]:
        """Forward the Metadata request for its allowed topics only; the denied ones come
        back in the response with TOPIC_AUTHORIZATION_FAILED (clients refresh metadata of
        every topic they know in one request: one denied topic must not hide the rest)."""
        kept = dict(value)
        kept["Topics"] = [t for t in value["Topics"] if t.get("Name") not in denied]
        body = codec.encode(head.api_key, "request", head.api_version, kept)
        frame = codec.request_frame(head.api_key, head.api_version, head.correlation_id,
                                    head.client_id, body)
        pending.denied_topics = denied
        self.emit({"verdict": "FORWARDED", "l7": flow_l7(
            attrs.evolve(pending, topics=tuple(t for t in pending.topics
                                               if t not in denied)), "REQUEST")})
        self.emit({"verdict": "DROPPED", "l7": flow_l7(
            attrs.evolve(pending, topics=denied), "REQUEST",
            responses.TOPIC_AUTHORIZATION_FAILED)})
        self.pending.append(pending)
        return [DROP(head.size), INSERT(frame)]

    def _bad(self, size: int, reason: str) -> list[Op]:
        self.closed = True
        self.emit({"verdict": "DROPPED", "error": reason,
                   "l7": {"type": "REQUEST", "kafka": {"error_code": -1}}})
        return [DROP(size), CLOSE]

    # responses ----------------------------------------------------------------------------
    def _response(self, data: bytes | memoryview) -> list[Op]:
        ops: list[Op] = []
        if self.resp_state == "finish":
            self.resp_state = "head"
            self.pending.popleft()
            ops += self._flush_local()
        if not data:
            return [*ops, MORE] if not ops else ops
        if len(data) < 8:
            return [*ops, MORE]
        size, correlation_id = struct.unpack_from(">ii", data, 0)
        if not self.pending or size < 4:
            return [*ops, *self._bad_response(len(data), "response nobody asked for")]
        request = self.pending[0]
        if correlation_id != request.correlation_id:
            return [*ops, *self._bad_response(
                len(data), f"response {correlation_id} while {request.correlation_id} is due")]
        rewrite = request.api_key == API_VERSIONS or request.denied_topics
        if (rewrite or size <= DECODE_RESPONSE_MAX) and len(data) < 4 + size:
            return [*ops, MORE]
        latency = time.monotonic_ns() - request.started_ns
        frame = bytes(data[:4 + size]) if len(data) >= 4 + size else b""
        value = self._decode_response(request, frame) if frame else None
        code = responses.first_error(value) if value is not None else 0
        self.emit({"verdict": "FORWARDED", "is_reply": True,
                   "l7": flow_l7(request, "RESPONSE", code, latency)})
        if rewrite and value is not None:
            new = self._rewrite(request, value)
            if new is not None:
                self.resp_state = "finish"
                return [*ops, DROP(4 + size), INSERT(new)]
        self.resp_state = "finish"
        return [*ops, PASS(4 + size)]

    def _decode_response(self, request: Pending, frame: bytes) -> dict[str, Any] | None:
        offset = 8 + (1 if codec.response_header_flexible(request.api_key,
                                                           request.api_version) else 0)
        try:
            if codec.response_header_flexible(request.api_key, request.api_version):
                codec.read_tags(codec.Reader(frame, 8))
            return codec.decode(request.api_key, "response", request.api_version,
                                memoryview(frame)[offset:])
        except (codec.Malformed, IndexError):
            if request.api_key == API_VERSIONS:  # an unsupported version: v0 answer
                try:
                    return codec.decode(API_VERSIONS, "response", 0, memoryview(frame)[8:])
                except codec.Malformed:
                    return None
            return None

    def _rewrite(self, request: Pending, value: dict[str, Any]) -> bytes | None:
        if request.api_key == API_VERSIONS:
            if value.get("ErrorCode"):
                return None
            keys = []
            for item in value.get("ApiKeys") or ():
                cap = max_version(item["ApiKey"])
                if cap is not None and item["MaxVersion"] > cap:
                    if item["MinVersion"] > cap:
                        continue  # nothing both sides speak: not offered
                    item = {**item, "MaxVersion": cap}
                keys.append(item)
            value = {**value, "ApiKeys": keys}
        else:
            topics = list(value.get("Topics") or ())
            topics += [{"Name": t, "ErrorCode": responses.TOPIC_AUTHORIZATION_FAILED}
                       for t in request.denied_topics]
            value = {**value, "Topics": topics}
        body = codec.encode(request.api_key, "response", request.api_version, value)
        return codec.response_frame(request.api_key, request.api_version,
                                    request.correlation_id, body)

    def _flush_local(self) -> list[Op]:
        ops: list[Op] = []
        while self.pending and self.pending[0].local is not None:
            ops.append(INSERT(self.pending.popleft().local))
        return ops

    def _bad_response(self, size: int, reason: str) -> list[Op]:
        self.closed = True
        self.emit({"verdict": "DROPPED", "is_reply": True, "error": reason,
                   "l7": {"type": "RESPONSE", "kafka": {"error_code": -1}}})
        return [DROP(size), CLOSE]

    def on_upstream_failure(self, reason: str) -> list[Op]:
        self.closed = True
        self.emit({"verdict": "DROPPED", "is_reply": True, "error": reason,
                   "l7": {"type": "RESPONSE", "kafka": {"error_code": -1}}})
        return [CLOSE]


class KafkaParserFactory(ParserFactory):
    """`pylium_l7_kafka.parser:KafkaParserFactory`, the spec the backend spawns the
    proxy with."""

    protocol = "kafka"
    #: a request is decided on whole: the proxy must buffer up to one frame
    max_buffer = codec.MAX_FRAME + 4

    def rules_from_json(self, rules: list[Mapping[str, Any]]) -> tuple[PortRuleKafka, ...]:
        return tuple(rule_from_json(r) for r in rules)

    def new_connection(self, info: ConnectionInfo, grants: GrantsNow,
                       emit: Emit) -> KafkaConnection:
        return KafkaConnection(info, grants, emit)
