"""Control protocol 5: a fast path's record in two parts (`FastRecord`: a recurring prefix,
then the rest) travels as its rest, its prefix sent once per agent connection and named by
number after that. Whatever the batches, the agents and the bound on numbers, the agent
gets the records the proxy made, and counts the same metrics as from whole records."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from pylium.l7 import proxy as proxy_module
from pylium.l7.supervisor import ProxySupervisor
from pylium_l7_http.parser import HttpParserFactory

from tests.unit.l7.test_agent_batches import (
    POLICY,
    _agent,
    _metrics,
    _Sock,
    _Transport,
    _Writer,
)

RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\r\nok\n")


def _request(path: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: svc\r\n\r\n" % path.encode()


class _Run:
    """A proxy with an agent listening (`_Writer`: the lines it wrote), its connections
    keep-alive exchanges on the fast paths."""

    def __init__(self, tmp_path: Path):
        self.proxy = proxy_module.Proxy(tmp_path, HttpParserFactory(), {"ingress": 1}, "0")
        self.proxy.policy.load(POLICY)
        self.writer = _Writer()
        self.proxy.listen_to(self.writer)
        self.conns: list[proxy_module.Connection] = []

    def conn(self) -> proxy_module.Connection:
        c = proxy_module.Connection(self.proxy, "ingress", 1, _Transport(
            _Sock(("10.0.0.1", 40000 + len(self.conns)), ("10.0.0.2", 80))))
        c.up, c.up_state = _Transport(), "open"
        self.conns.append(c)
        return c

    def exchange(self, c: proxy_module.Connection, path: str = "/x") -> None:
        c.received(c.request, _request(path))
        c.received(c.reply, RESPONSE)


def _records_of(lines: list[bytes]) -> list[bytes]:
    """Every record of these lines whole, as an agent's supervisor takes them."""
    got: list[dict] = []
    sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=got.append,
                          on_flows=got.extend)
    for line in lines:
        assert sup.take(line) is None
    assert sup.malformed_records == 0 and sup.unknown_conns == 0
    return [orjson.dumps({k: v for k, v in r.items() if k != "seq"}) for r in got]


def _unacknowledged(p: proxy_module.Proxy) -> list[bytes]:
    """The records the proxy keeps until acknowledged, decoded whole with their
    connection's part (what `_records_of` must give)."""
    conns = {cid: orjson.loads(b"{%b}" % entry)[str(cid)]
             for cid, entry in p.flow_conns.items()}
    out = []
    for _seq, c, record in p.unacknowledged():
        cid, reply = divmod(abs(c), 2)
        flow = dict(conns[cid][reply])
        flow.update(orjson.loads(b"{%b}" % record))
        out.append(orjson.dumps(flow))
    return out


def test_a_recurring_prefix_travels_once_per_agent_connection(tmp_path):
    async def scenario() -> None:
        run = _Run(tmp_path)
        a, b = run.conn(), run.conn()
        for _ in range(3):
            for _ in range(4):
                run.exchange(a)
                run.exchange(b)
            run.proxy._flush_flows()
        lines = list(run.writer.lines)
        assert len(lines) == 3
        heads = [orjson.loads(line.split(proxy_module.RECORD_SEP, 1)[0]) for line in lines]
        # the first line brings the request's record and the response's prefix (both
        # connections' are the same bytes)
        assert len(heads[0]["prefixes"]) == 2 and "prefixes" not in heads[1]
        assert all(p >= 0 for head in heads for p in head["p"])  # every record in two parts
        assert max(len(line) for line in lines[1:]) < 400  # 16 records: their rests only
        got = _records_of(lines)
        assert len(got) == 48 and got == _unacknowledged(run.proxy)
        # a new agent: the prefixes again, with the records not acknowledged
        again = _Writer()
        run.proxy.listen_to(again)
        assert len(again.lines) == 3 and b"nginx" in again.lines[0]  # (a batch a line)
        assert _records_of(again.lines) == got
    asyncio.run(scenario())


def test_the_numbering_starts_again_past_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy_module, "PREFIXES_MAX", 3)

    async def scenario() -> None:
        run = _Run(tmp_path)
        c = run.conn()
        for i in range(6):  # a request record (and a response prefix) per URL
            run.exchange(c, f"/x{i}")
            run.exchange(c, f"/x{i}")
            run.proxy._flush_flows()
        heads = [orjson.loads(line.split(proxy_module.RECORD_SEP, 1)[0])
                 for line in run.writer.lines]
        assert any(head.get("prefixes_reset") for head in heads)
        assert len(run.proxy.prefix_ids) <= 3 + 1 + 2  # (b"", and a batch's new ones)
        assert _records_of(run.writer.lines) == _unacknowledged(run.proxy)
    asyncio.run(scenario())


BASE = {"src_ip": "10.0.0.2", "sport": 80, "src_identity": 1001, "dst_ip": "10.0.0.1",
        "dport": 40000, "dst_identity": 2001, "ep_id": 7, "proxy_port": 1, "direction": 0}


def _line(prefixes: list[bytes], numbers: list[int], rests: list[bytes]) -> bytes:
    conns = b'"1":[%b,%b]' % (orjson.dumps({**BASE, "is_reply": False}),
                              orjson.dumps({**BASE, "is_reply": True}))
    head = orjson.dumps({"op": "flows", "seq": 1, "c": [3] * len(rests), "p": numbers,
                         "prefixes": list(range(len(prefixes)))})
    return b"%b,\"conns\":{%b}}\x1e%b\n" % (head[:-1], conns,
                                            b"\x1e".join([*prefixes, *rests]))


def test_a_prefix_number_never_sent_is_counted_not_trusted():
    line = _line([b'"verdict":"FORWARDED",'], [0, 5], [b'"l7":{}', b'"l7":{}'])
    got: list[dict] = []
    sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=got.append,
                          on_flows=got.extend)
    assert sup.take(line) is None
    assert sup.malformed_records == 1 and got[0]["verdict"] == "FORWARDED"
    assert "verdict" not in got[1]  # its rest alone: counted, nothing made up
    with pytest.raises(ValueError, match="names prefixes"):
        sup.take(_line([], [0], [b"x", b"y"]))


RECORD = (b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET","url":"/x",'
          b'"code":200,"protocol":"HTTP/1.1","headers":[]},"latency_ns":')


@pytest.mark.parametrize(("prefix", "rests"), [
    (RECORD, [b"5}", b"1500000}", b"0}", b"20000000000}"]),  # as the fast path makes them
    (RECORD, [b"5}", b'"7"}']),      # a latency that is no number
    (RECORD, [b"5}", b"7.5}"]),      # nor an integer
    (RECORD, [b"5}", b"-7}"]),       # a negative one
    (RECORD, [b"5}", b'7,"x":1}']),  # more after it
    (RECORD[:-3], [b'":5}', b'":7}']),  # a prefix not up to the latency
    (RECORD.replace(b'"code":200', b'"code":0'), [b"5}", b"7}"]),  # no status code
    (RECORD.replace(b'"headers":[]', b'"headers":[{"key":"a","value":"b"}]'),
     [b"5}", b"3}"]),
])
def test_responses_in_two_parts_count_as_whole_ones(prefix, rests):
    """The HTTP metrics read a two-part response's labels off its prefix and its latency
    off its rest; what is not laid out so is joined and counted as before: the same
    counts and histogram as the records taken whole."""
    line = _line([prefix], [0] * len(rests), rests)
    whole = _line([], [-1] * len(rests), [prefix + rest for rest in rests])
    new_backend, new, new_sup = _agent([line], batches=True)
    old_backend, old, _ = _agent([whole], batches=False)
    assert _metrics(new_backend) == _metrics(old_backend)
    assert ([f.l7 for f in new.ring.snapshot()] == [f.l7 for f in old.ring.snapshot()])
    assert new_sup.malformed_records == 0


def test_the_agents_recorder_hands_the_prefixes_to_the_flow_layer():
    """The L7 context's recorder (the flow layer starts after the parsers) passes a batch's
    records in two parts on as they are: the flows read whole."""
    from types import SimpleNamespace

    from pylium.flow.component import FlowObserver
    from pylium.l7.component import LazyFlowRecorder

    observer = FlowObserver("n")
    recorder = LazyFlowRecorder(SimpleNamespace(components={}))
    head = recorder.l7_head({**BASE, "is_reply": True})
    assert head == ()  # no flow layer yet: nothing is recorded
    recorder.record_l7_raw([head], [b"5}"], [RECORD])
    recorder.daemon.components["flow"] = observer
    head = recorder.l7_head({**BASE, "is_reply": True})
    recorder.record_l7_raw([head, head], [b"5}", b"7}"], [RECORD, RECORD])
    assert [f.l7["latency_ns"] for f in observer.ring.snapshot()] == [5, 7]


def test_a_prefix_cache_cleared_while_learning_counts_as_whole(monkeypatch):
    """More new prefixes in one batch than the labels cache keeps: those it forgot while
    learning are counted as before (joined), none lost or miscounted."""
    from pylium_l7_http import backend as http_backend

    monkeypatch.setattr(http_backend, "LABELS_CACHE", 1)
    other = RECORD.replace(b'"code":200', b'"code":404')
    line = _line([RECORD, other], [0, 1, 0, 1], [b"5}", b"6}", b"7}", b"8}"])
    whole = _line([], [-1] * 4, [RECORD + b"5}", other + b"6}", RECORD + b"7}",
                                 other + b"8}"])
    new_backend, _, _ = _agent([line], batches=True)
    old_backend, _, _ = _agent([whole], batches=False)
    assert _metrics(new_backend) == _metrics(old_backend)
    assert sum(v for (name, _l), v in _metrics(new_backend).items()
               if name == "hubble_http_requests_total") == 4
