"""Helpers for the Kafka parser tests: a tiny op engine (what the proxy does with the ops)
and frame builders."""

from __future__ import annotations

from pylium.l7.parser import ConnectionInfo, Grant, OpType
from pylium.policy.kafka import PortRuleKafka
from pylium_l7_kafka import codec
from pylium_l7_kafka.parser import KafkaConnection

INFO = ConnectionInfo(direction="ingress", src_ip="10.0.0.2", src_port=40000,
                      dst_ip="10.0.0.3", dst_port=9092, src_identity=2001,
                      dst_identity=1001)


def grants(*rules: PortRuleKafka) -> tuple[Grant, ...]:
    return (Grant(rule="test", rules=tuple(rules)),)


class Engine:
    """Feeds one KafkaConnection as the proxy's op engine does, recording what went where."""

    def __init__(self, *rules: PortRuleKafka, allow_all: bool = False):
        self.grants = (Grant(rule="all", allow_all=True),) if allow_all else grants(*rules)
        self.flows: list[dict] = []
        self.conn = KafkaConnection(INFO, lambda: self.grants, self.flows.append)
        self.bufs = {False: bytearray(), True: bytearray()}
        self.to_broker = bytearray()
        self.to_client = bytearray()
        self.closed = False

    def feed(self, reply: bool, data: bytes) -> None:
        buf = self.bufs[reply]
        buf += data
        for _ in range(10000):
            if self.closed:
                return
            ops = self.conn.on_data(reply, bytes(buf), False)
            progressed = False
            for op in ops:
                if op.type is OpType.MORE:
                    return
                if op.type in (OpType.PASS, OpType.DROP):
                    assert op.n <= len(buf), "a decision beyond the buffered frame"
                    chunk = bytes(buf[:op.n])
                    del buf[:op.n]
                    if op.type is OpType.PASS:
                        (self.to_client if reply else self.to_broker).extend(chunk)
                    progressed = progressed or op.n > 0
                elif op.type is OpType.INJECT:
                    (self.to_broker if reply else self.to_client).extend(op.data)
                    progressed = True
                elif op.type is OpType.INSERT:
                    (self.to_client if reply else self.to_broker).extend(op.data)
                    progressed = True
                elif op.type is OpType.CLOSE:
                    self.closed = True
                    return
            if not buf and not progressed:
                return
            assert progressed or ops, "no progress"
        raise AssertionError("the parser spins")

    def request(self, api_key: int, version: int, correlation_id: int, value: dict,
                client_id: str | None = "client") -> bytes:
        frame = request(api_key, version, correlation_id, value, client_id)
        self.feed(False, frame)
        return frame

    def respond(self, api_key: int, version: int, correlation_id: int, value: dict) -> bytes:
        frame = codec.response_frame(api_key, version, correlation_id,
                                     codec.encode(api_key, "response", version, value))
        self.feed(True, frame)
        return frame


def request(api_key: int, version: int, correlation_id: int, value: dict,
            client_id: str | None = "client") -> bytes:
    return codec.request_frame(api_key, version, correlation_id, client_id,
                               codec.encode(api_key, "request", version, value))


def split_frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        out.append(data[pos:pos + 4 + size])
        pos += 4 + size
    return out


def read_response(frame: bytes, api_key: int, version: int) -> tuple[int, dict]:
    """(correlation id, decoded body) of one response frame."""
    correlation_id = int.from_bytes(frame[4:8], "big", signed=True)
    offset = 9 if codec.response_header_flexible(api_key, version) else 8
    return correlation_id, codec.decode(api_key, "response", version, frame[offset:])
