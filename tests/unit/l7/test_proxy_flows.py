"""The proxy's flow records, encoded once when made: each decodes to the connection's part
plus the parser's record, batches are one JSON line of them, an acknowledgement drops them
and the buffer's bound counts what it loses."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from pylium.l7 import proxy as proxy_module
from pylium.l7.parser import ConnectionInfo
from pylium.l7.proxy import Proxy, _flow_base
from pylium_l7_http.parser import HttpParserFactory

INFO = ConnectionInfo(direction="ingress", src_ip="10.0.0.1", src_port=40000,
                      dst_ip="10.0.0.2", dst_port=80, src_identity=2001, dst_identity=1001,
                      ep_id=3, proxy_port=10080)
CLIENT = {"ip": "10.0.0.1", "port": 40000, "identity": 2001}
SERVER = {"ip": "10.0.0.2", "port": 80, "identity": 1001}


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Writer:
    def __init__(self):
        self.lines: list[bytes] = []
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Reader:
    def __init__(self, lines: list[bytes]):
        self.lines = list(lines)

    async def readline(self) -> bytes:
        return self.lines.pop(0) if self.lines else b""


def _proxy(tmp_path) -> Proxy:
    return Proxy(tmp_path, HttpParserFactory(), {"ingress": 10080}, "test")


def test_a_record_is_the_connection_part_and_the_parsers_fields(tmp_path):
    p = _proxy(tmp_path)
    base = _flow_base(CLIENT, SERVER, INFO, False)
    l7 = {"type": "REQUEST", "http": {"method": "GET", "url": "http://h/x", "headers": []}}
    p.flow(orjson.dumps(base)[:-1], {"verdict": "FORWARDED", "l7": l7, "rule": "r"})
    p.flow(orjson.dumps(_flow_base(SERVER, CLIENT, INFO, True))[:-1],
           {"verdict": "DROPPED", "is_reply": True, "error": "bad", "l7": {"type": "RESPONSE"}})
    (seq1, first), (seq2, second) = p.unacknowledged()
    assert (seq1, seq2) == (1, 2)
    assert json.loads(first) == {**base, "verdict": "FORWARDED", "l7": l7, "rule": "r",
                                 "seq": 1}
    reply = json.loads(second)
    assert reply["src_ip"] == "10.0.0.2" and reply["is_reply"] is True
    assert reply["error"] == "bad" and reply["seq"] == 2 and "rule" not in reply
    assert p.stats["requests"] == 1 and p.stats["forwarded"] == 1
    assert p.stats["parse_errors"] == 1


def test_batches_are_one_json_line_and_acks_drop_records(tmp_path):
    async def run():
        p = _proxy(tmp_path)
        writer = _Writer()
        p.controller = writer
        base = orjson.dumps(_flow_base(CLIENT, SERVER, INFO, False))[:-1]
        for n in range(3):
            p.flow(base, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": n}})
        assert writer.lines == []  # waits for others to share its batch
        await asyncio.sleep(proxy_module.FLOW_FLUSH_DELAY * 3)
        assert len(writer.lines) == 1 and writer.lines[0].endswith(b"\n")
        batch = json.loads(writer.lines[0])
        assert batch["op"] == "flows"
        assert [f["l7"]["n"] for f in batch["flows"]] == [0, 1, 2]
        assert [f["seq"] for f in batch["flows"]] == [1, 2, 3]
        p._acked(2)  # part of a batch
        assert [seq for seq, _ in p.unacknowledged()] == [3]
        assert p.describe()["buffered_flows"] == 1
        # the next agent gets what is unacknowledged again, then new records in new batches
        p.flow(base, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": 3}})
        other = _Writer()
        await p._control(_Reader([b'{"op":"hello"}\n']), other)
        assert [f["seq"] for line in other.lines[1:] for f in json.loads(line)["flows"]] == \
            [3, 4]
        p._acked(4)
        assert p.unacknowledged() == [] and p.describe()["buffered_flows"] == 0
    asyncio.run(run())


@pytest.mark.parametrize("batch", [1, 2, 1000])
def test_the_buffer_bound_drops_the_oldest_and_counts_it(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(proxy_module, "FLOW_BUFFER", 2)
    monkeypatch.setattr(proxy_module, "FLOW_BATCH", batch)
    p = _proxy(tmp_path)
    base = orjson.dumps(_flow_base(CLIENT, SERVER, INFO, False))[:-1]
    for _ in range(3):
        p.flow(base, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
    p._flush_flows()  # the bound holds from every flush on (a batch may exceed it until)
    assert [seq for seq, _ in p.unacknowledged()] == [2, 3]
    assert p.stats["flows_lost"] == 1


@pytest.mark.parametrize("reply", [False, True])
def test_a_base_is_a_json_object_prefix(reply):
    base = orjson.dumps(_flow_base(CLIENT, SERVER, INFO, reply))[:-1]
    assert json.loads(base + b"}")["is_reply"] is reply
