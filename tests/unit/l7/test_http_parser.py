"""The HTTP parser as the proxy drives it (pylium.l7.parser contract), with byte strings:
rule matching, local replies and their order, framing of bodies, malformed input."""

from __future__ import annotations

import pytest
from pylium.l7.parser import ConnectionInfo, Grant, OpType
from pylium.policy.http import HeaderMatch, PortRuleHTTP
from pylium_l7_http.parser import (
    ACCESS_DENIED,
    HttpConnection,
    HttpParserFactory,
    judge,
    rule_from_json,
)

INFO = ConnectionInfo(direction="ingress", src_ip="10.0.0.1", src_port=40000,
                      dst_ip="10.0.0.2", dst_port=80, src_identity=2000, dst_identity=1000)
FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n"
             b"\r\nAccess denied\r\n")


class Drive:
    """Applies ops like the proxy does, for data given whole (a PASS/DROP beyond the data
    is remembered as still owed)."""

    def __init__(self, grants):
        self.records = []
        self.conn = HttpConnection(INFO, lambda: grants, self.records.append)
        self.upstream = b""
        self.client = b""
        self.closed = False
        self.owed = {False: 0, True: 0}

    def feed(self, reply: bool, data: bytes, eof: bool = False) -> None:
        owed = min(self.owed[reply], len(data))
        if owed:  # the rest of a PASS given earlier goes through without the parser
            if reply:
                self.client += data[:owed]
            else:
                self.upstream += data[:owed]
            self.owed[reply] -= owed
            data = data[owed:]
            if self.owed[reply]:
                return
        buf = bytearray(data)
        for _ in range(1000):  # the proxy calls again until MORE (with b"" once drained)
            ops = self.conn.on_data(reply, bytes(buf), eof)
            for op in ops:
                if op.type in (OpType.PASS, OpType.DROP):
                    take = min(op.n, len(buf))
                    chunk = bytes(buf[:take])
                    del buf[:take]
                    if op.type is OpType.PASS:
                        if reply:
                            self.client += chunk
                        else:
                            self.upstream += chunk
                    self.owed[reply] = op.n - take
                    if self.owed[reply]:
                        return
                elif op.type is OpType.INJECT:
                    if reply:
                        self.upstream += op.data
                    else:
                        self.client += op.data
                elif op.type is OpType.INSERT:
                    if reply:
                        self.client += op.data
                    else:
                        self.upstream += op.data
                elif op.type is OpType.CLOSE:
                    self.closed = True
                    return
            if not ops or ops[-1].type is OpType.MORE:
                return
        raise AssertionError("the parser never asked for MORE")


GET_ALLOWED = b"GET /public HTTP/1.1\r\nHost: svc\r\n\r\n"
GET_DENIED = b"GET /private HTTP/1.1\r\nHost: svc\r\n\r\n"
RULES = (Grant(rule="r", rules=(PortRuleHTTP(method="GET", path="/public"),)),)


def response(body: bytes = b"hello") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def test_allowed_request_is_forwarded_byte_for_byte():
    d = Drive(RULES)
    d.feed(False, GET_ALLOWED)
    assert d.upstream == GET_ALLOWED and d.client == b""
    assert d.records[0]["verdict"] == "FORWARDED"
    assert d.records[0]["l7"]["http"]["method"] == "GET"
    assert d.records[0]["l7"]["http"]["url"] == "http://svc/public"


def test_denied_request_gets_cilium_403_and_never_reaches_upstream():
    d = Drive(RULES)
    d.feed(False, GET_DENIED)
    assert d.upstream == b""
    assert d.client == FORBIDDEN
    assert ACCESS_DENIED == b"Access denied\r\n"
    assert d.records[0]["verdict"] == "DROPPED" and d.records[0]["l7"]["http"]["code"] == 403
    assert not d.closed  # keep-alive goes on


def test_no_grants_means_nothing_is_allowed():
    d = Drive(None)
    d.feed(False, GET_ALLOWED)
    assert d.upstream == b"" and d.client == FORBIDDEN


def test_allow_all_grant_allows_every_request():
    d = Drive((Grant(rule="l4-only", allow_all=True),))
    d.feed(False, b"DELETE /anything HTTP/1.1\r\nHost: x\r\n\r\n")
    assert d.upstream.startswith(b"DELETE /anything")


@pytest.mark.parametrize("rule,request_kw,allowed", [
    (PortRuleHTTP(method="GET"), dict(method="GETX"), False),          # anchored
    (PortRuleHTTP(method="GET|HEAD"), dict(method="HEAD"), True),
    (PortRuleHTTP(path="/v1/.*"), dict(path="/v1/x?y=1"), True),
    (PortRuleHTTP(path="/v1"), dict(path="/v1/x"), False),
    (PortRuleHTTP(path="/v1"), dict(path="/v1?q"), False),           # :path has the query
    (PortRuleHTTP(host="svc\\.example"), dict(host="svc.example"), True),
    (PortRuleHTTP(host="svc\\.example"), dict(host="svc.example:8080"), False),
    (PortRuleHTTP(headers=("X-Token",)), dict(headers={"x-token": "a"}), True),
    (PortRuleHTTP(headers=("X-Token",)), dict(headers={}), False),
    (PortRuleHTTP(headers=("X-Token: abc",)), dict(headers={"X-Token": "abc"}), True),
    (PortRuleHTTP(headers=("X-Token: abc",)), dict(headers={"X-Token": "abd"}), False),
    (PortRuleHTTP(header_matches=(HeaderMatch("X-A", "1"),)), dict(headers={"x-a": "2"}),
     False),
    (PortRuleHTTP(header_matches=(HeaderMatch("X-A", "1", "LOG"),)),
     dict(headers={"x-a": "2"}), True),
])
def test_rule_semantics(rule, request_kw, allowed):
    kw = {"method": "GET", "path": "/", "host": "h", "headers": {}, **request_kw}
    got = judge((Grant(rule="r", rules=(rule,)),), kw["method"], kw["path"], kw["host"],
                kw["headers"])
    assert got.allowed is allowed


def test_header_mismatch_log_is_reported_in_the_flow():
    rule = PortRuleHTTP(header_matches=(HeaderMatch("X-A", "1", "LOG"),))
    d = Drive((Grant(rule="r", rules=(rule,)),))
    d.feed(False, b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 2\r\n\r\n")
    assert d.upstream.startswith(b"GET /")
    headers = d.records[0]["l7"]["http"]["headers"]
    assert {"key": "x-pylium-header-mismatch", "value": "X-A"} in headers


def test_pipelined_local_reply_waits_for_the_response_before_it():
    d = Drive(RULES)
    d.feed(False, GET_ALLOWED + GET_DENIED + GET_ALLOWED)
    assert d.upstream == GET_ALLOWED + GET_ALLOWED
    assert d.client == b""  # the 403 must not overtake response 1
    d.feed(True, response(b"one"))
    assert d.client == response(b"one") + FORBIDDEN
    d.feed(True, response(b"three"))
    assert d.client == response(b"one") + FORBIDDEN + response(b"three")


def test_content_length_body_streams_as_one_pass():
    d = Drive((Grant(rule="r", allow_all=True),))
    d.feed(False, b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 100000000\r\n\r\nabc")
    assert d.upstream.endswith(b"\r\n\r\nabc")
    assert d.owed[False] == 100000000 - 3


def test_chunked_body_passes_chunk_by_chunk_and_the_next_request_is_judged():
    d = Drive(RULES + (Grant(rule="p", rules=(PortRuleHTTP(method="POST"),)),))
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
    head = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    d.feed(False, head + body + GET_DENIED)
    assert d.upstream == head + body
    assert d.client == FORBIDDEN or d.client == b""  # queued behind POST's response
    d.feed(True, response())
    assert d.client == response() + FORBIDDEN


def test_denied_chunked_body_is_dropped_and_keep_alive_continues():
    d = Drive(RULES)
    head = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    d.feed(False, head + b"3\r\nabc\r\n0\r\n\r\n" + GET_ALLOWED)
    assert d.upstream == GET_ALLOWED
    assert d.client == FORBIDDEN


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
])
def test_malformed_request_is_answered_400_and_never_forwarded(raw):
    d = Drive((Grant(rule="r", allow_all=True),))
    d.feed(False, raw)
    assert d.upstream == b""
    assert d.client.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in d.client and d.closed
    assert d.records[0]["error"]


def test_head_response_has_no_body_and_100_continue_is_interim():
    d = Drive((Grant(rule="r", allow_all=True),))
    d.feed(False, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    d.feed(True, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    d.feed(False, b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    d.feed(True, b"HTTP/1.1 100 Continue\r\n\r\n")
    d.feed(False, b"hi")
    d.feed(True, response(b"done"))
    codes = [r["l7"]["http"]["code"] for r in d.records if r["l7"]["type"] == "RESPONSE"]
    assert codes == [200, 200]
    assert d.client.endswith(response(b"done"))


def test_denied_expect_100_continue_closes_after_403():
    d = Drive(RULES)
    d.feed(False, b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
    assert d.client.startswith(b"HTTP/1.1 403 Forbidden\r\n") and d.closed
    assert d.upstream == b""


def test_upstream_failure_is_503_with_the_reason():
    d = Drive(RULES)
    d.feed(False, GET_ALLOWED)
    ops = d.conn.on_upstream_failure("connection refused")
    assert ops[0].data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert ops[0].data.endswith(b"upstream connect error: connection refused\r\n")
    assert ops[-1].type is OpType.CLOSE


def test_rules_from_json_refuse_what_cannot_be_enforced():
    factory = HttpParserFactory()
    rules = factory.rules_from_json([{"method": "GET", "header_matches": [
        {"name": "X", "value": "1", "mismatch": "LOG"}]}])
    assert rules[0].header_matches[0].mismatch == "LOG"
    with pytest.raises(ValueError, match="mismatch"):
        rule_from_json({"header_matches": [{"name": "X", "value": "1", "mismatch": "ADD"}]})
    with pytest.raises(ValueError, match="unknown"):
        rule_from_json({"methdo": "GET"})


def test_allowed_upgrade_tunnels_after_101_and_a_refused_one_stays_http():
    d = Drive((Grant(rule="r", allow_all=True),))
    d.feed(False, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket"
                  b"\r\n\r\n")
    assert d.conn.on_data(False, b"early", False)[-1].type is OpType.MORE  # held for the 101
    d.feed(True, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nsrv")
    d.feed(False, b"\x81\x05hello not http")
    assert d.upstream.endswith(b"\x81\x05hello not http")
    assert d.client.endswith(b"\r\n\r\nsrv")
    d2 = Drive(RULES)
    d2.feed(False, b"GET /public HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                   b"Upgrade: websocket\r\n\r\n")
    d2.feed(True, response(b"no"))
    d2.feed(False, GET_DENIED)  # still HTTP, still judged
    assert d2.client.endswith(FORBIDDEN)


# the stream path: whole messages parsed by one persistent parser per direction ---------------

def test_whole_messages_keep_one_stream_parser_and_record_what_the_general_path_does():
    d = Drive(RULES)
    d.feed(False, GET_ALLOWED)
    stream = d.conn.req_stream
    assert stream is not None and d.upstream == GET_ALLOWED
    d.feed(True, response(b"one"))
    resp_stream = d.conn.resp_stream
    assert resp_stream is not None and d.client == response(b"one")
    d.feed(False, GET_ALLOWED)
    d.feed(True, response(b"two"))
    assert d.conn.req_stream is stream and d.conn.resp_stream is resp_stream
    assert d.client == response(b"one") + response(b"two")
    # the same bytes pipelined in one read (the first of each by the general path): the
    # records must agree
    g = Drive(RULES)
    g.feed(False, GET_ALLOWED + GET_ALLOWED)
    g.feed(True, response(b"one") + response(b"two"))
    def strip(records):  # in order per direction; latency differs
        return [{k: v for k, v in r.items() if k != "l7"} | {
            "l7": {k: v for k, v in r["l7"].items() if k != "latency_ns"}}
            for reply in (False, True) for r in records if bool(r.get("is_reply")) == reply]

    assert strip(d.records) == strip(g.records)
    assert len(d.records) == 4


def test_stream_path_falls_back_and_resumes_at_the_next_boundary():
    d = Drive((Grant(rule="r", allow_all=True),))
    post = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
    d.feed(False, post + b"abc")  # a partial body: the general path, the stream dropped
    assert d.conn.req_stream is None and d.owed[False] == 7
    d.feed(False, b"defghij")
    d.feed(True, response())
    d.feed(False, GET_ALLOWED)  # whole again: a new stream parser from this boundary
    assert d.conn.req_stream is not None
    assert d.upstream == post + b"abcdefghij" + GET_ALLOWED
    d.feed(False, b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nab")  # 1 extra
    assert d.conn.req_stream is None
    assert d.upstream.endswith(b"Content-Length: 1\r\n\r\na")


def test_stream_path_leaves_a_response_to_head_to_the_general_framing():
    d = Drive((Grant(rule="r", allow_all=True),))
    d.feed(False, b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n")
    head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    d.feed(True, head_only)  # no body follows a response to HEAD
    assert d.client == head_only and d.owed[True] == 0
    d.feed(False, GET_ALLOWED)
    d.feed(True, response(b"next"))
    assert d.client == head_only + response(b"next")
    assert [r["l7"]["http"]["code"] for r in d.records if r.get("is_reply")] == [200, 200]


def test_stream_path_refuses_what_the_general_path_refuses():
    d = Drive((Grant(rule="r", allow_all=True),))
    bad = (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    d.feed(False, bad)
    assert d.upstream == b"" and d.client.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("raw", [
    b"GET /denied HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET /denied HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\n",
    b"GET /denied HTTP/1.0\r\nHost: h\r\n\r\n",
])
@pytest.mark.parametrize("pipelined", [b"", b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"])
def test_a_denied_request_that_ends_its_connection_is_answered_and_closed(raw, pipelined):
    """llhttp forgets `Connection: close` once a message without body is complete: the
    head's keep-alive is taken when its headers are (one message: by the stream parser;
    pipelined: by the head parser). What follows it is not forwarded."""
    d = Drive((Grant(rule="r", rules=(PortRuleHTTP(path="/x"),)),))
    d.feed(False, raw + pipelined)
    assert d.upstream == b"" and b" 403 Forbidden\r\n" in d.client
    assert b"connection: close" in d.client and d.closed


def test_a_denied_keep_alive_request_keeps_its_connection():
    d = Drive((Grant(rule="r", rules=(PortRuleHTTP(path="/x"),)),))
    d.feed(False, b"GET /denied HTTP/1.1\r\nHost: h\r\n\r\n")
    assert d.client == FORBIDDEN and not d.closed
