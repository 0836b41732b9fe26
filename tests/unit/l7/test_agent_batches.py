"""The agent's protocol 4 path (`ProxiedParser._batch`: records kept as the proxy sent
them, `L7Flow`s decoded when read, metrics counted from the raw records) against the path
every record took before (whole records, `ProxiedParser._flows`): for the same lines of a
real proxy — fast and general paths, quotes and odd headers, denied requests, parse
errors, HEAD and chunked responses, both directions — the flows (Hubble JSON, filters),
the proxy and Hubble HTTP metrics and the decoder's counts are the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pylium.api.context import L7Context
from pylium.api.node import NodeInfo
from pylium.flow.component import FlowObserver
from pylium.flow.filters import parse_query
from pylium.flow.model import L7Flow, Peer, compact_line, to_response
from pylium.l7 import proxy as proxy_module
from pylium.l7.supervisor import ProxySupervisor
from pylium_l7_http.backend import L7Http
from pylium_l7_http.parser import HttpParserFactory

NODE = NodeInfo("n", "10.0.0.1", "10.0.0.0/24")
GRANT = {"rule": "r\"q", "kind": "http",
         "rules": [{"method": "GET|HEAD", "path": "/x.*"}, {"method": "POST", "path": "/p"}]}
POLICY = {"ipcache": [["10.0.0.1/32", 2001], ["10.0.0.2/32", 1001]], "endpoints": [
    {"ipv4": "10.0.0.2", "ep_id": 7, "identity": 1001, "entries": [
        {"identity": 0, "direction": "ingress", "protocol": 6, "port": 80,
         "port_prefix_len": 16, "grants": [GRANT]}]},
    {"ipv4": "10.0.0.1", "ep_id": 3, "identity": 2001, "entries": [
        {"identity": 0, "direction": "egress", "protocol": 6, "port": 80,
         "port_prefix_len": 16, "grants": [GRANT]}]}]}
ODD_HEADERS = (b'X-Quote: a "quoted" \\ value\r\nX-Latin: caf\xe9 \t\r\n'
               b"Authorization: Bearer secret\r\nX-Empty:\r\nX-Json: {\"a\":[1,2]}\r\n")


def _response(code: int, headers: bytes = b"", body: bytes = b"ok\n") -> bytes:
    return (b"HTTP/1.1 %d X\r\nServer: nginx\r\n%bContent-Length: %d\r\n\r\n%b"
            % (code, headers, len(body), body))


class _Sock:
    def __init__(self, src: tuple[str, int], dst: tuple[str, int]):
        self.src, self.dst = src, dst

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return self.dst

    def getpeername(self) -> tuple[str, int]:
        return self.src


class _Transport:
    def __init__(self, sock: _Sock | None = None):
        self.sock = sock
        self.data = b""
        self.closed = False

    def get_extra_info(self, name: str) -> _Sock | None:
        return self.sock

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 65536)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class _Writer:
    def __init__(self):
        self.lines: list[bytes] = []
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def is_closing(self) -> bool:
        return False


def _proxy_lines(tmp_path: Path) -> list[bytes]:
    """A real proxy's control lines for a mix of exchanges on three connections."""
    async def run() -> list[bytes]:
        p = proxy_module.Proxy(tmp_path, HttpParserFactory(), {"ingress": 1, "egress": 2},
                               "0")
        p.policy.load(POLICY)
        p.controller = writer = _Writer()

        def conn(direction: str, sport: int) -> proxy_module.Connection:
            port = 1 if direction == "ingress" else 2
            c = proxy_module.Connection(p, direction, port, _Transport(
                _Sock(("10.0.0.1", sport), ("10.0.0.2", 80))))
            c.up, c.up_state = _Transport(), "open"
            return c

        def exchange(c: proxy_module.Connection, request: bytes, *responses: bytes) -> None:
            c.received(c.request, request)
            for response in responses:
                c.received(c.reply, response)

        a, b = conn("ingress", 40000), conn("egress", 40001)
        exchange(a, b"GET /x HTTP/1.1\r\nHost: svc:80\r\n" + ODD_HEADERS + b"\r\n",
                 _response(200, b'Set-Cookie: s=1\r\nX-Q: "\\"\r\n'))
        exchange(a, b"GET /x?q=%22a%22 HTTP/1.1\r\nHost: svc\r\n\r\n", _response(404))
        exchange(b, b"GET /x HTTP/1.1\r\nHost: svc\r\nUser-Agent: wrk\r\n\r\n",
                 _response(503, body=b"no"))
        p._flush_flows()
        exchange(a, b"HEAD /x HTTP/1.1\r\nHost: svc\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")  # general path
        exchange(b, b"GET /no HTTP/1.1\r\nHost: svc\r\n\r\n")  # denied: 403 by the proxy
        exchange(b, b"POST /p HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi",
                 b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n0\r\n\r\n")  # chunked: general path
        exchange(a, b"GET /x HTTP/1.0\r\n\r\n", _response(200))  # no host, HTTP/1.0
        p._flush_flows()
        c = conn("ingress", 40002)
        exchange(c, b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n", _response(204, body=b""))
        exchange(c, b"BROKEN\r\n\r\n")  # a parse error
        c.close()
        p._flush_flows()
        assert p.seq == 16
        return writer.lines
    return asyncio.run(run())


def _resolver(ip: str, identity: int, ep_id: int) -> Peer | None:
    return Peer(ID=ep_id, identity=identity, namespace="ns", pod_name=f"pod-{ip}",
                labels=("k8s:app=x",)) if ep_id else None


def _agent(lines: list[bytes], batches: bool) -> tuple[L7Http, FlowObserver, ProxySupervisor]:
    """An agent taking these lines: protocol 4's batch path, or every record whole."""
    flows = FlowObserver("n", _resolver)
    backend = L7Http.from_context(L7Context(name="http", node=NODE,
                                            metrics=CollectorRegistry(), flows=flows))
    sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=backend._flow,
                          on_flows=backend._flows,
                          on_batch=backend._batch if batches else None)
    for line in lines:
        assert sup.take(line) is None
    return backend, flows, sup


def _metrics(backend: L7Http) -> dict:
    out = {}
    registry = backend.context.metrics
    for family in registry.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _without_time(response: dict) -> dict:
    response = dict(response, flow=dict(response["flow"]))
    del response["time"], response["flow"]["time"]
    return response


def test_batches_give_the_flows_and_metrics_whole_records_gave(tmp_path):
    lines = _proxy_lines(tmp_path)
    old_backend, old, old_sup = _agent(lines, batches=False)
    new_backend, new, new_sup = _agent(lines, batches=True)
    before, after = old.ring.snapshot(), new.ring.snapshot()
    assert len(before) == len(after) == 16
    assert new_sup.unknown_conns == old_sup.unknown_conns == 0
    assert any(type(f) is L7Flow for f in after)  # the fast path's records stay raw
    for was, now in zip(before, after, strict=True):
        assert _without_time(to_response(now)) == _without_time(to_response(was))
        assert was.l7 == now.l7 and was[1:22] == now[1:22]
        assert compact_line(to_response(now))[19:] == compact_line(to_response(was))[19:]
    l7s = [f.l7 for f in after]
    assert any(h["value"] == 'a "quoted" \\ value' for f in l7s
               for h in f.get("http", {}).get("headers", ()))
    assert {f.verdict for f in after} == {"FORWARDED", "DROPPED"}
    assert any(f.direction == 1 for f in after) and any(f.direction == 0 for f in after)
    assert all(f.l7["latency_ns"] > 0 for f in after if f.l7["type"] == "RESPONSE"
               and f.verdict == "FORWARDED")
    metrics = _metrics(new_backend)
    assert metrics == _metrics(old_backend)
    assert {k[1] for k in metrics if k[0] == "hubble_http_requests_total"} >= {
        (("method", "GET"), ("protocol", "HTTP/1.1"), ("reporter", "server"),
         ("status", "404")),
        (("method", "GET"), ("protocol", "HTTP/1.1"), ("reporter", "client"),
         ("status", "403"))}
    assert metrics[("pylium_policy_l7_total", (("protocol", "http"),
                                               ("rule", "parse_errors")))] == 1
    assert new.decoder.counts == old.decoder.counts
    assert new_backend.flows_recorded == old_backend.flows_recorded == len(after)
    for query in ({"protocol": ["http"]}, {"http_method": ["head"]}, {"http_path": ["^/x"]},
                  {"http_status": ["2+"]}, {"http_status": ["404"]},
                  {"verdict": ["DROPPED"]}):
        query["last"] = ["100"]
        got = [_without_time(to_response(f)) for f in parse_query(query).select(after)]
        assert got == [_without_time(to_response(f))
                       for f in parse_query(query).select(before)], query
        assert got, query


def test_the_histogram_and_counts_add_up_over_many_batches(tmp_path):
    """The same lines taken twice: every count and bucket doubles, the sums match."""
    lines = _proxy_lines(tmp_path)
    old_backend, _, _ = _agent(lines + lines, batches=False)
    new_backend, _, _ = _agent(lines + lines, batches=True)
    assert _metrics(new_backend) == _metrics(old_backend)


@pytest.mark.parametrize("fields", [
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET","code":200,'
    b'"protocol":"HTTP/1.1"},"latency_ns":5}',  # no headers
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","latency_ns":7,"http":{"method":"GET",'
    b'"code":500,"protocol":"HTTP/1.1","headers":[]}}',  # latency first
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET","code":0,'
    b'"protocol":"HTTP/1.1","headers":[]},"latency_ns":5}',  # no status
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"headers":[],"method":"GET",'
    b'"code":302,"protocol":"HTTP/1.1"},"latency_ns":5}',  # headers first
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET","code":200,'
    b'"protocol":"HTTP/1.1","headers":[{"key":"x","value":"\\\\"}]},"latency_ns":0}',
    b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET","code":200,'
    b'"protocol":"HTTP/1.1","headers":[]},"latency_ns":"5"}',  # not a number
])
def test_a_fast_record_laid_out_otherwise_counts_as_decoded(tmp_path, fields):
    """The HTTP plugin reads labels and latency off a fast-path response's bytes; one not
    laid out as its parser lays it out is decoded whole, and counts the same."""
    base = {"op": "flow", "src_ip": "10.0.0.2", "sport": 80, "src_identity": 1001,
            "dst_ip": "10.0.0.1", "dport": 40000, "dst_identity": 2001, "ep_id": 7,
            "proxy_port": 1, "direction": 0, "is_reply": True}

    line = (b'{"op":"flows","seq":1,"c":[3],"conns":{"1":[%b,%b]}}\x1e%b\n'
            % (orjson.dumps({**base, "is_reply": False}), orjson.dumps(base), fields))
    old_backend, old, _ = _agent([line], batches=False)
    new_backend, new, _ = _agent([line], batches=True)
    assert _metrics(new_backend) == _metrics(old_backend)
    assert [f.l7 for f in new.ring.snapshot()] == [f.l7 for f in old.ring.snapshot()]


def test_unknown_connections_and_undecodable_records_are_counted_not_recorded():
    line = (b'{"op":"flows","seq":1,"c":[9,-9]}\x1e"verdict":"FORWARDED","l7":{}'
            b'\x1e"verdict":"DROPPED","l7":{}\n')
    backend, flows, sup = _agent([line], batches=True)
    assert flows.ring.snapshot() == [] and sup.unknown_conns == 2
    assert sup.acked_upto == 2  # taken (and never sent again)
    base = (b'{"src_ip":"1.1.1.1","dst_ip":"2.2.2.2","sport":1,"dport":2,'
            b'"src_identity":0,"dst_identity":0}')
    bad = (b'{"op":"flows","seq":3,"c":[-2],"conns":{"1":[%b,%b]}}\x1e{not json\n'
           % (base, base))
    backend, flows, sup = _agent([bad], batches=True)
    assert flows.ring.snapshot() == [] and sup.malformed_records == 1


def test_flow_heads_follow_the_enrichment_and_new_connections(tmp_path):
    """A connection side's flow head is made once, again when the flow layer's
    enrichment is forgotten (a pod's labels changed): later flows name the new peer, as
    the whole-record path does."""
    lines = _proxy_lines(tmp_path)
    names = {"pod": "before"}

    def resolver(ip: str, identity: int, ep_id: int) -> Peer | None:
        return Peer(ID=ep_id, identity=identity, pod_name=names["pod"]) if ep_id else None

    agents = []
    for batches in (False, True):
        flows = FlowObserver("n", resolver)
        backend = L7Http.from_context(L7Context(name="http", node=NODE,
                                                metrics=CollectorRegistry(), flows=flows))
        sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=backend._flow,
                              on_flows=backend._flows,
                              on_batch=backend._batch if batches else None)
        agents.append((flows, sup))
    for i, line in enumerate(lines):
        if i == 1:
            names["pod"] = "after"
            for flows, _ in agents:
                flows.decoder.invalidate()
        for _, sup in agents:
            sup.take(line)
    (old, _), (new, _) = agents
    pods = [{f.source.pod_name, f.destination.pod_name} - {""} for f in new.ring.snapshot()]
    assert pods == [{f.source.pod_name, f.destination.pod_name} - {""}
                    for f in old.ring.snapshot()]
    assert pods[0] == {"before"} and pods[-1] == {"after"}


@pytest.mark.parametrize("slice_size", [1, 2, 3, 5])
def test_a_batch_taken_in_slices_gives_what_it_gives_whole(tmp_path, monkeypatch, slice_size):
    """The agent takes a batch INTAKE_SLICE records at a time and offers its CPU between
    slices: wherever the cuts fall (through runs of fast records, between a fast record
    and a whole one), the flows, metrics and counts are those of the batch taken at once."""
    from pylium.l7 import backend as backend_module

    lines = _proxy_lines(tmp_path)
    whole_backend, whole, _ = _agent(lines, batches=True)
    yields = []
    monkeypatch.setattr(backend_module, "INTAKE_SLICE", slice_size)
    monkeypatch.setattr(backend_module, "yield_cpu", lambda: yields.append(1))
    sliced_backend, sliced, _ = _agent(lines, batches=True)
    sizes = [len(orjson.loads(line.split(b"\x1e", 1)[0])["c"]) for line in lines
             if b"\x1e" in line]
    assert len(yields) == sum((n - 1) // slice_size for n in sizes) > 0
    assert ([_without_time(to_response(f)) for f in sliced.ring.snapshot()]
            == [_without_time(to_response(f)) for f in whole.ring.snapshot()])
    assert len(sliced.ring.snapshot()) == 16
    assert _metrics(sliced_backend) == _metrics(whole_backend)
    assert sliced.decoder.counts == whole.decoder.counts
    assert sliced_backend.flows_recorded == whole_backend.flows_recorded == 16


def test_an_agent_behind_its_proxy_takes_the_batch_without_yielding(tmp_path, monkeypatch):
    """More of the proxy's lines waiting (`ProxySupervisor.backlogged`): no CPU offered
    between slices, the same flows."""
    from pylium.l7 import backend as backend_module

    lines = _proxy_lines(tmp_path)
    yields = []
    monkeypatch.setattr(backend_module, "INTAKE_SLICE", 2)
    monkeypatch.setattr(backend_module, "yield_cpu", lambda: yields.append(1))
    monkeypatch.setattr(ProxySupervisor, "backlogged", lambda self: True)
    _backend, flows, _ = _agent(lines, batches=True)
    assert yields == [] and len(flows.ring.snapshot()) == 16
