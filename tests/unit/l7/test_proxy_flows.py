"""The proxy's flow records, encoded once when made: each decodes to the connection's part
plus the parser's record, batches are one JSON line of them, an acknowledgement drops them
and the buffer's bound counts what it loses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import pytest
from pylium.l7 import proxy as proxy_module
from pylium.l7.parser import ConnectionInfo
from pylium.l7.proxy import Proxy, _flow_base
from pylium.l7.supervisor import ProxySupervisor, expand_flows
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


def _bases() -> tuple[bytes, bytes]:
    return (orjson.dumps(_flow_base(CLIENT, SERVER, INFO, False)),
            orjson.dumps(_flow_base(SERVER, CLIENT, INFO, True)))


def agent_records(p: Proxy) -> tuple[list[dict], ProxySupervisor]:
    """The unacknowledged records as a new agent gets them: the batch line the proxy
    writes it (every connection announced), read by the agent's supervisor into whole
    records (`on_flows`). The proxy is left as it was."""
    got: list[dict] = []
    sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=got.append,
                          on_flows=got.extend)
    writer = _Writer()
    saved = p.controller, p.announce, p.gone
    p.controller, p.announce, p.gone = writer, list(p.flow_conns.values()), []
    try:
        records = p.unacknowledged()
        if records:
            p._write_batch([r for _seq, _c, r in records], [c for _seq, c, _r in records],
                           records[0][0])
    finally:
        p.controller, p.announce, p.gone = saved
    for line in writer.lines:
        assert sup.take(line) is None
    return got, sup


def _whole(p: Proxy) -> list[dict]:
    """The unacknowledged records as an agent gets them (`agent_records`)."""
    flows, sup = agent_records(p)
    assert sup.unknown_conns == 0 and sup.malformed_records == 0
    return flows


def _line(line: bytes) -> tuple[dict, list[bytes]]:
    """A protocol 4 batch line: its head and its records (one connection side each)."""
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    head, *records = line[:-1].split(proxy_module.RECORD_SEP)
    head = orjson.loads(head)
    assert len(head["c"]) == len(records)
    return head, records


def test_a_record_is_the_connection_part_and_the_parsers_fields(tmp_path):
    p = _proxy(tmp_path)
    cid = p.new_flow_conn(_bases())
    base = _flow_base(CLIENT, SERVER, INFO, False)
    l7 = {"type": "REQUEST", "http": {"method": "GET", "url": "http://h/x", "headers": []}}
    p.flow(cid * 2, {"verdict": "FORWARDED", "l7": l7, "rule": "r"})
    p.flow(cid * 2 + 1,
           {"verdict": "DROPPED", "is_reply": True, "error": "bad", "l7": {"type": "RESPONSE"}})
    assert [seq for seq, _c, _r in p.unacknowledged()] == [1, 2]
    first, reply = _whole(p)
    assert first == {**base, "verdict": "FORWARDED", "l7": l7, "rule": "r", "seq": 1}
    assert reply["src_ip"] == "10.0.0.2" and reply["is_reply"] is True
    assert reply["error"] == "bad" and reply["seq"] == 2 and "rule" not in reply
    assert p.stats["requests"] == 1 and p.stats["forwarded"] == 1
    assert p.stats["parse_errors"] == 1


def _protocol2_line(bases: tuple[bytes, bytes], records: list[tuple[int, bytes]]) -> bytes:
    """What a protocol 2 proxy wrote for these records ((is_reply, fields) each)."""
    return b'{"op":"flows","flows":[%b]}' % b",".join(
        b"%b,%b,\"seq\":%d}" % (bases[reply][:-1], fields, n + 1)
        for n, (reply, fields) in enumerate(records))


def test_records_expanded_by_the_agent_equal_protocol_2s_whole_records(tmp_path):
    """Protocol 4 sends a connection's part once and a record as the parser made it; what
    the agent expands is exactly the record protocol 2 sent whole, and protocol 2 and 3
    lines (a proxy an older agent left running) still read as before."""
    async def run():
        p = _proxy(tmp_path)
        writer = _Writer()
        p.controller = writer
        bases = _bases()
        cid = p.new_flow_conn(bases)
        fields = [(0, b'"verdict":"FORWARDED","l7":{"type":"REQUEST","http":{"method":"GET",'
                      b'"url":"http://h/x","protocol":"HTTP/1.1","headers":[]}},"rule":"r"'),
                  (1, b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"code":200,'
                      b'"protocol":"HTTP/1.1","headers":[]},"latency_ns":5}')]
        for reply, f in fields:
            p.seq += 1
            p.add_record(cid * 2 + reply, f)
        p._flush_flows()
        head, records = _line(writer.lines[0])
        assert list(head["conns"]) == [str(cid)] and head["seq"] == 1
        assert head["c"] == [cid * 2, cid * 2 + 1] and records == [f for _reply, f in fields]
        old = orjson.loads(_protocol2_line(bases, fields))
        got: list = []
        sup = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=got.append)
        assert sup.take(writer.lines[0]) is None
        assert got == old["flows"] and sup.unknown_conns == 0
        assert sup.sides  # still open: the agent keeps its part
        # protocol 2 and 3 lines
        assert expand_flows({}, old) == (old["flows"], 0)
        line3 = {"op": "flows", "conns": {str(cid): [orjson.loads(b) for b in bases]},
                 "flows": [{"c": cid * 2 + reply, **orjson.loads(b"{%b}" % f), "seq": n + 1}
                           for n, (reply, f) in enumerate(fields)]}
        line3_bytes = orjson.dumps(line3) + b"\n"
        assert expand_flows({}, line3) == (old["flows"], 0)
        got.clear()
        sup3 = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=got.append)
        assert sup3.take(line3_bytes) is None
        assert sup3.take(_protocol2_line(bases, fields) + b"\n") is None
        assert got == old["flows"] * 2
        unknown = b'{"op":"flows","seq":3,"c":[99,-99]}\x1e"verdict":"FORWARDED","l7":{}' \
                  b'\x1e"verdict":"DROPPED","l7":{}\n'
        got.clear()
        assert sup.take(unknown) is None and got == [] and sup.unknown_conns == 2
        with pytest.raises(ValueError):  # not the protocol: the control connection ends
            sup.take(b'{"op":"flows","seq":5,"c":[3]}\x1e"l7":{}\x1e"l7":{}\n')
    asyncio.run(run())


def test_a_connection_is_announced_once_and_dropped_when_gone(tmp_path):
    async def run():
        p = _proxy(tmp_path)
        writer = _Writer()
        p.controller = writer
        sup = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=lambda f: None)
        a, b = p.new_flow_conn(_bases()), p.new_flow_conn(_bases())
        p.flow(a * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
        p._flush_flows()
        p.flow(b * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
        p.flow_conn_closed(a)
        p._flush_flows()
        (first, _), (second, _) = (_line(line) for line in writer.lines)
        assert set(first["conns"]) == {str(a), str(b)} and "gone" not in first
        assert "conns" not in second and second["gone"] == [a]
        flows: list = []
        sup.on_flows = flows.extend
        for line in writer.lines:
            sup.take(line)
        assert [f["seq"] for f in flows] == [1, 2] and sup.unknown_conns == 0
        assert set(sup.sides) == {b * 2, b * 2 + 1}
        assert set(p.flow_conns) == {a, b}  # the proxy keeps it until acknowledged
        p._acked(2)
        assert set(p.flow_conns) == {b}
    asyncio.run(run())


def test_a_new_agent_gets_the_unacknowledged_records_whole(tmp_path, monkeypatch):
    """An agent that dies before acknowledging: the next one gets every connection the
    resent records name (a closed one too), then the records, in several batches."""
    monkeypatch.setattr(proxy_module, "FLOW_BATCH", 2)

    async def run():
        p = _proxy(tmp_path)
        p.controller = _Writer()
        a, b = p.new_flow_conn(_bases()), p.new_flow_conn(_bases())
        for n, c in enumerate((a * 2, b * 2, a * 2 + 1, b * 2 + 1, a * 2)):
            p.flow(c, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": n}})
        p.flow_conn_closed(a)
        p._flush_flows()
        expected = _whole(p)
        assert p.controller.lines  # the first agent got them, and died without acknowledging
        other = _Writer()
        await p._control(_Reader([b'{"op":"hello"}\n']), other)
        got: list = []
        sup = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=got.append)
        heads = [_line(line)[0] for line in other.lines[1:]]
        assert len(heads) == 3 and [h["seq"] for h in heads] == [1, 3, 5]
        for line in other.lines[1:]:
            sup.take(line)
        assert got == expected and sup.unknown_conns == 0
        assert [f["l7"]["n"] for f in got] == [0, 1, 2, 3, 4]
        assert heads[-1]["gone"] == [a] and all("gone" not in h for h in heads[:-1])
        assert set(sup.sides) == {b * 2, b * 2 + 1}
    asyncio.run(run())


def test_batches_are_one_json_line_and_acks_drop_records(tmp_path):
    async def run():
        p = _proxy(tmp_path)
        writer = _Writer()
        p.controller = writer
        cid = p.new_flow_conn(_bases())
        for n in range(3):
            p.flow(cid * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": n}})
        assert writer.lines == []  # waits for others to share its batch
        await asyncio.sleep(proxy_module.FLOW_FLUSH_DELAY * 3)
        assert len(writer.lines) == 1 and writer.lines[0].endswith(b"\n")
        head, records = _line(writer.lines[0])
        assert head["op"] == "flows" and head["seq"] == 1
        assert [orjson.loads(b"{%b}" % r)["l7"]["n"] for r in records] \
            == [0, 1, 2]
        p._acked(2)  # part of a batch
        assert [seq for seq, _c, _r in p.unacknowledged()] == [3]
        assert p.describe()["buffered_flows"] == 1
        # the next agent gets what is unacknowledged again, then new records in new batches
        p.flow(cid * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": 3}})
        other = _Writer()
        await p._control(_Reader([b'{"op":"hello"}\n']), other)
        assert [(_line(line)[0]["seq"], len(_line(line)[1])) for line in other.lines[1:]] \
            == [(3, 1), (4, 1)]
        assert _line(other.lines[1])[0]["conns"]  # the connection announced again
        p._acked(4)
        assert p.unacknowledged() == [] and p.describe()["buffered_flows"] == 0
    asyncio.run(run())


@pytest.mark.parametrize("batch", [1, 2, 1000])
def test_the_buffer_bound_drops_the_oldest_and_counts_it(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(proxy_module, "FLOW_BUFFER", 2)
    monkeypatch.setattr(proxy_module, "FLOW_BATCH", batch)
    p = _proxy(tmp_path)
    a, b = p.new_flow_conn(_bases()), p.new_flow_conn(_bases())
    p.flow(a * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
    p.flow_conn_closed(a)
    for _ in range(2):
        p.flow(b * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
    p._flush_flows()  # the bound holds from every flush on (a batch may exceed it until)
    assert [seq for seq, _c, _r in p.unacknowledged()] == [2, 3]
    assert p.stats["flows_lost"] == 1
    assert set(p.flow_conns) == {b}  # no record left names the closed one


@pytest.mark.parametrize("reply", [False, True])
def test_a_base_is_a_json_object(reply):
    assert json.loads(_bases()[reply])["is_reply"] is reply


@pytest.mark.parametrize(("control_protocol", "adopted"),
                         [(2, True), (3, True), (proxy_module.CONTROL_PROTOCOL, True),
                          (1, False),
                          (proxy_module.CONTROL_PROTOCOL + 1, False), (None, False)])
def test_a_running_proxy_of_protocol_2_or_3_is_adopted(tmp_path, control_protocol, adopted):
    """A proxy an older agent left running (protocol 2 or 3) keeps serving under the new
    agent;
    one it cannot read is replaced."""
    sup = ProxySupervisor(tmp_path, "x:y", {"ingress": 10080}, "v", on_flow=lambda f: None)
    hello = {"version": "v", "control_protocol": control_protocol, "reuseport": False,
             "ports": {"ingress": 10080}}
    assert sup._compatible(hello) is adopted


def test_the_supervisor_hands_each_batch_as_it_came_to_on_batch(tmp_path):
    """With `on_batch` the agent gets a batch's records unexpanded (`FlowBatch`: a record
    names its connection side; `whole()` of one is what `on_flows` gets), and
    acknowledges up to its last seq."""
    async def run():
        p = _proxy(tmp_path)
        p.controller = writer = _Writer()
        cid = p.new_flow_conn(_bases())
        for n in range(3):
            p.flow(cid * 2 + n % 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": n}})
        p._flush_flows()
        expected = _whole(p)
        batches, whole = [], []
        sup = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=whole.append,
                              on_flows=whole.extend, on_batch=batches.append)
        await sup._read(_Reader(writer.lines))
        assert whole == [] and len(batches) == 1 and sup.acked_upto == 3
        batch = batches[0]
        assert batch.seq == 1 and len(batch.records) == 3
        assert [batch.whole(c, r, batch.seq + i)
                for i, (c, r) in enumerate(zip(batch.cs, batch.records, strict=True))] \
            == batch.expand() == expected
        assert batch.cs == [-cid * 2, -cid * 2 - 1, -cid * 2]  # not a fast path's
        assert batch.sides[cid * 2 + 1].reply is True
    asyncio.run(run())


def test_the_supervisor_hands_each_batch_whole_to_on_flows(tmp_path):
    """With `on_flows` the agent gets a batch line's expanded records in one call, and
    acknowledges up to its last seq."""
    async def run():
        p = _proxy(tmp_path)
        p.controller = writer = _Writer()
        cid = p.new_flow_conn(_bases())
        for n in range(3):
            p.flow(cid * 2 + n % 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST", "n": n}})
        p._flush_flows()
        expected = _whole(p)
        batches, single = [], []
        sup = ProxySupervisor(tmp_path, "x:y", {}, "t", on_flow=single.append,
                              on_flows=batches.append)
        await sup._read(_Reader(writer.lines))
        assert batches == [expected] and single == []
        assert sup.acked_upto == 3
    asyncio.run(run())


def test_connections_without_an_agent_or_records_are_not_kept(tmp_path):
    """A closed connection none of whose records waits for an agent is forgotten at once
    (no agent for a long time must not grow the proxy); one with a waiting record stays."""
    p = _proxy(tmp_path)
    for _ in range(100):
        p.flow_conn_closed(p.new_flow_conn(_bases()))
    assert p.flow_conns == {} and p.announce == [] and p.gone == []
    cid = p.new_flow_conn(_bases())
    p.flow(cid * 2, {"verdict": "FORWARDED", "l7": {"type": "REQUEST"}})
    p.flow_conn_closed(cid)
    assert list(p.flow_conns) == [cid]  # its record waits for the next agent
    assert _whole(p)[0]["src_ip"] == "10.0.0.1"
