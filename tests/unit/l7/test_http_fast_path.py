"""The HTTP parser's fast paths (one whole message per read, records pre-encoded, verdicts
cached per connection): what they record must equal what the general path (`on_data`)
records for the same bytes, a policy change must reach the next request, and whatever they
do not handle must be left to the general path untouched."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from pylium.l7 import proxy as proxy_module
from pylium.l7.parser import ConnectionInfo, Grant
from pylium.policy.http import HeaderMatch, PortRuleHTTP
from pylium_l7_http import parser as http_parser
from pylium_l7_http.parser import HttpConnection, HttpParserFactory

from tests.unit.l7.test_http_parser import FORBIDDEN, Drive
from tests.unit.l7.test_proxy_flows import agent_records

INFO = ConnectionInfo(direction="ingress", src_ip="10.0.0.1", src_port=40000,
                      dst_ip="10.0.0.2", dst_port=80, src_identity=2000, dst_identity=1000)
ALLOW_X = (Grant(rule="r", rules=(PortRuleHTTP(method="GET|POST|HEAD", path="/x"),)),)
REQUEST = b"GET /x HTTP/1.1\r\nHost: svc:80\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 05:00:00 GMT\r\n"
            b"Content-Length: 3\r\n\r\nok\n")


class _FakeSock:
    """The accepted socket a `Connection` asks for its addresses."""

    def setsockopt(self, *a):
        pass

    def getsockname(self):
        return ("10.0.0.2", 80)

    def getpeername(self):
        return ("10.0.0.1", 40000)


class _FakeTransport:
    """A transport that keeps what is written to it."""

    def __init__(self):
        self.data = b""

    def get_extra_info(self, name):
        return _FakeSock()

    def write(self, data):
        self.data += data


class Fast:
    """One HttpConnection with its fast paths, its records decoded as the proxy's would be
    (fields of the fast path; dict records of the general path, `is_reply` aside).
    `request(data)` / `response(data)`: whether that fast path took the read."""

    def __init__(self, grants):
        self.grants = grants
        self.records: list[dict] = []
        self.conn = HttpConnection(INFO, lambda: self.grants, self._general)
        self._request, self._response = self.conn.fast_paths()

    def request(self, data: bytes) -> bool:
        return self._fast(False, self._request(data))

    def response(self, data: bytes) -> bool:
        return self._fast(True, self._response(data))

    def _fast(self, reply: bool, fields: tuple[bytes, bytes] | None) -> bool:
        if fields is None:
            return False
        assert type(fields) is tuple and len(fields) == 2  # (prefix, rest): `FastRecord`
        fields = b"".join(fields)
        self.records.append({"reply": reply, **orjson.loads(b"{" + fields + b"}")})
        return True

    def _general(self, record: dict) -> None:
        record = dict(record)
        self.records.append({"reply": bool(record.pop("is_reply", False)), **record})


def _general_records(grants, exchanges) -> list[dict]:
    """The same exchanges through `on_data` only (the general path)."""
    d = Drive(grants)
    for request, response in exchanges:
        d.conn.req_stream = d.conn.resp_stream = None  # no stream parser: the head parser
        d.feed(False, request)
        d.feed(True, response)
    return [{"reply": bool(r.pop("is_reply", False)), **r} for r in d.records]


def _without_latency(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        r = dict(r, l7=dict(r["l7"]))
        assert r["l7"].pop("latency_ns", 1) >= 0
        out.append(r)
    return out


@pytest.mark.parametrize("request_, response", [
    (REQUEST, RESPONSE),
    # every header the fast path cannot copy as it is: quote, backslash, tab, latin-1,
    # a value with trailing spaces, redacted ones (either case)
    (b'GET /x HTTP/1.1\r\nHost: svc\r\nX-Q: a"b\\\\c\r\nX-T: a\tb\r\nX-L: caf\xe9\r\n'
     b"X-S: v  \r\nCookie: secret\r\nAUTHORIZATION: Basic x\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1\r\nContent-Length: 0\r\n\r\n"),
    (b"POST /x HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\n"
     b"body",
     b"HTTP/1.0 201 Created\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi"),
    (b"GET /x HTTP/1.1\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n"),  # no host
    # empty and blank values, a repeated name, a Host not first, spaces llhttp allows
    # around the URL (the fast path takes the URL from the line)
    (b"GET  /x  HTTP/1.1\r\nX-E:\r\nX-B: \t \r\nX-R: 1\r\nhOST:  svc \r\nX-R: 2\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nX-E:\r\nContent-Length: 1\r\nX-R:a\r\nX-R: b\r\n\r\n!"),
])
def test_fast_records_equal_the_general_paths(request_, response):
    f = Fast(ALLOW_X)
    for _ in range(3):  # then from the head caches, then from the connection's last heads
        assert f.request(request_) is True
        assert f.response(response) is True
    assert not f.conn.pending
    general = _general_records(ALLOW_X, [(request_, response)] * 3)
    assert _without_latency(f.records) == _without_latency(general)
    assert len(f.records) == 6 and all(r["l7"].get("latency_ns", 0) > 0
                                       for r in f.records if r["reply"])
    headers = {h["key"]: h["value"] for h in f.records[0]["l7"]["http"]["headers"]}
    if "Cookie" in headers:
        assert headers["Cookie"] == headers["AUTHORIZATION"] == "[redacted]"
        assert headers["X-S"] == "v" and headers["X-L"] == "caf\xe9"
        # a secret's fragment is made every time, never kept
        assert not any(name.lower() in http_parser.REDACTED
                       for name, _value in http_parser._FRAGMENTS)
        assert (b"X-S", b"v  ") in http_parser._FRAGMENTS


def test_a_policy_change_between_two_keep_alive_requests_applies_to_the_second():
    f = Fast(ALLOW_X)
    assert f.request(REQUEST) and f.response(RESPONSE)
    f.grants = (Grant(rule="other", rules=(PortRuleHTTP(path="/y"),)),)  # a push
    assert f.request(REQUEST) is False  # no longer allowed: the general path answers
    ops = f.conn.on_data(False, REQUEST, False)
    assert ops[-1].data == FORBIDDEN or any(op.data == FORBIDDEN for op in ops)
    assert f.records[-1]["verdict"] == "DROPPED"
    f.grants = ALLOW_X  # and back
    assert f.request(REQUEST) is True
    assert f.records[-1]["verdict"] == "FORWARDED" and f.records[-1]["rule"] == "r"
    f.grants = None  # no policy key covers the connection: nothing is allowed
    assert f.request(REQUEST) is False


def test_the_verdict_cache_tells_requests_apart_by_line_and_host():
    grants = (Grant(rule="h", rules=(PortRuleHTTP(method="GET", path="/x", host="svc"),)),)
    f = Fast(grants)
    assert f.request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n") is True
    assert f.request(b"GET /x HTTP/1.1\r\nHost: evil\r\n\r\n") is False
    f.conn.req_messages = None
    assert f.request(b"GET /x?a HTTP/1.1\r\nHost: svc\r\n\r\n") is False
    f.conn.req_messages = None
    assert f.request(b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n") is False
    f.conn.req_messages = None
    assert f.request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n") is True


@pytest.mark.parametrize("rule", [
    PortRuleHTTP(headers=("X-Token",)),
    PortRuleHTTP(headers=("X-Token: 1",)),
    PortRuleHTTP(header_matches=(HeaderMatch("X-A", "1"),)),
    PortRuleHTTP(header_matches=(HeaderMatch("X-A", "1", "LOG"),)),
])
@pytest.mark.parametrize("request_", [
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Token: 1\r\nX-A: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nx-token: 2\r\nX-A: 2\r\nX-A: 1\r\n\r\n",  # first value
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
])
def test_rules_with_header_conditions_judge_every_request_like_the_general_path(rule,
                                                                                request_):
    grants = (Grant(rule="r", rules=(rule,)),)
    f = Fast(grants)
    for _ in range(2):  # the second from the head's verdict: the same answer
        if not f.request(request_):  # not allowed: the general path answers
            assert f.conn.on_data(False, request_, False)[0].type.name == "DROP"
        f.conn.pending.clear()
    g = Drive(grants)
    for _ in range(2):
        g.feed(False, request_)
        g.conn.pending.clear()
    general = [{"reply": bool(r.pop("is_reply", False)), **r} for r in g.records]
    assert f.records == general and len(general) == 2


@pytest.mark.parametrize("data", [
    REQUEST + REQUEST,                                                   # pipelined
    REQUEST[:-2],                                                        # a part
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc",        # body follows
    b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n",                           # absolute form
    b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",                                # malformed
])
def test_what_the_fast_path_declines_the_general_path_handles_as_before(data):
    f = Fast(ALLOW_X)
    assert f.request(data) is False
    assert f.records == [] and not f.conn.pending and f.conn.req_messages is None
    # the general path on a fresh connection and after the declined fast path: the same
    g = Drive(ALLOW_X)
    g.feed(False, data)
    d = Drive(ALLOW_X)
    assert d.conn.fast_paths()[0](data) is None
    d.feed(False, data)
    assert (d.upstream, d.client, d.closed) == (g.upstream, g.client, g.closed)
    assert d.records == g.records


def test_responses_the_fast_path_leaves_to_the_general_path():
    f = Fast(ALLOW_X)
    assert f.request(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n") is True
    assert f.response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n") is False  # no body
    f.conn.pending.clear()
    assert f.request(REQUEST) is True
    assert f.response(b"HTTP/1.1 100 Continue\r\n\r\n") is False  # interim
    assert f.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") \
        is False
    assert f.response(RESPONSE[:-1]) is False  # a part
    assert f.request(REQUEST) is True
    assert f.response(RESPONSE) is False  # two outstanding: in order by the general path
    assert len(f.conn.pending) == 2


def test_the_proxy_forwards_fast_messages_and_records_them_like_the_general_path(tmp_path):
    """Through `pylium.l7.proxy.Connection`: records decode to the connection's part and
    the parser's fields, the fast path's requests count in the stats."""
    Transport = _FakeTransport

    async def run():
        p = proxy_module.Proxy(tmp_path, HttpParserFactory(), {"ingress": 1}, "0")
        grant = {"rule": "r", "kind": "http", "rules": [{"method": "GET", "path": "/x"}]}
        p.policy.load({"endpoints": [{"ipv4": "10.0.0.2", "ep_id": 1, "identity": 1000,
                                      "entries": [{"identity": 0, "direction": "ingress",
                                                   "port": 80, "port_prefix_len": 16,
                                                   "grants": [grant]}]}]})
        conn = proxy_module.Connection(p, "ingress", 1, Transport())
        conn.up, conn.up_state = Transport(), "open"
        conn.received(conn.request, REQUEST)
        conn.received(conn.reply, RESPONSE)
        conn.received(conn.request, b"GET /no HTTP/1.1\r\nHost: svc:80\r\n\r\n")
        assert conn.up.data == REQUEST and conn.down.data == RESPONSE + FORBIDDEN
        records, sup = agent_records(p)  # as the agent gets them
        assert sup.unknown_conns == 0
        assert [r["seq"] for r in records] == [1, 2, 3]
        assert [(r["l7"]["type"], r["verdict"], r["is_reply"]) for r in records] == [
            ("REQUEST", "FORWARDED", False), ("RESPONSE", "FORWARDED", True),
            ("REQUEST", "DROPPED", False)]
        assert records[0]["src_ip"] == "10.0.0.1" and records[1]["src_ip"] == "10.0.0.2"
        assert records[0]["l7"]["http"]["url"] == "http://svc:80/x"
        assert records[1]["l7"]["http"]["code"] == 200 and records[1]["l7"]["latency_ns"] > 0
        stats = p.describe()["stats"]
        assert (stats["requests"], stats["forwarded"], stats["denied"]) == (2, 1, 1)
    asyncio.run(run())


def test_the_protocols_hand_reads_to_the_connection_without_a_frame_of_their_own(tmp_path):
    """What a transport calls with each read is the protocol's `data_received` as found
    when the protocol was set: after `connection_made` the client's is set again, so the
    event loop calls `Connection.received` for that side directly."""
    class Transport(_FakeTransport):
        def __init__(self):
            super().__init__()
            self.protocol = None

        def set_protocol(self, protocol):
            self.protocol = protocol
            self.data_received = protocol.data_received  # (uvloop keeps this one)

    async def run():
        p = proxy_module.Proxy(tmp_path, HttpParserFactory(), {"ingress": 1}, "0")
        p.policy.load({"endpoints": [{"ipv4": "10.0.0.2", "ep_id": 1, "identity": 1000,
                                      "entries": [{"identity": 0, "direction": "ingress",
                                                   "port": 80, "port_prefix_len": 16,
                                                   "grants": [{"rule": "r",
                                                               "allow_all": True}]}]}]})
        down = Transport()
        protocol = proxy_module._Downstream(p, "ingress", 1)
        protocol.connection_made(down)
        conn = protocol.conn
        assert down.protocol is protocol
        assert down.data_received.func == conn.received
        assert down.data_received.args == (conn.request,)
        conn.up, conn.up_state = Transport(), "open"
        upstream = proxy_module._Upstream(conn)
        assert upstream.data_received.args == (conn.reply,)
        down.data_received(REQUEST)
        upstream.data_received(RESPONSE)
        assert conn.up.data == REQUEST and down.data == RESPONSE
        assert len(p.batch) == 2 and p.describe()["stats"]["requests"] == 1
    asyncio.run(run())


def test_verdicts_are_shared_per_grants_and_the_caches_stay_bounded(monkeypatch):
    grants = (Grant(rule="r", rules=(PortRuleHTTP(path="/.*"),)),)
    first, second = Fast(grants), Fast(grants)
    assert first.request(REQUEST) is True
    assert second.conn._verdicts_for is not grants
    assert second.request(REQUEST) is True
    assert second.conn._verdicts is first.conn._verdicts  # one cache per policy key's grants
    assert list(first.conn._verdicts) == [(b"GET /x HTTP/1.1", b"svc:80")]
    # a long request line is judged, not kept; so is a long header value's fragment
    long_path = b"/" + b"a" * http_parser.VERDICT_KEY_MAX
    long_value = b"v" * (http_parser.FRAGMENT_VALUE_MAX + 1)
    first.conn.pending.clear()
    assert first.request(b"GET %s HTTP/1.1\r\nHost: svc\r\nX-Long: %s\r\n\r\n"
                         % (long_path, long_value)) is True
    assert len(first.conn._verdicts) == 1
    assert (b"X-Long", long_value) not in http_parser._FRAGMENTS
    assert first.records[-1]["l7"]["http"]["headers"][-1]["value"] == long_value.decode()
    # the caches are emptied when full, never grow past their bounds
    monkeypatch.setattr(http_parser, "VERDICT_CACHE", 2)
    for n in range(5):
        first.conn.pending.clear()
        assert first.request(b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % n) is True
        assert len(first.conn._verdicts) <= 2
    monkeypatch.setattr(http_parser, "FRAGMENT_CACHE", 3)
    for n in range(5):
        first.conn.pending.clear()
        assert first.request(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-N: %d\r\n\r\n" % n)
        assert len(http_parser._FRAGMENTS) <= 3
        assert first.records[-1]["l7"]["http"]["headers"][-1] == {"key": "X-N",
                                                                   "value": str(n)}
    monkeypatch.setattr(http_parser, "VERDICT_GRANT_SETS", 2)
    for _ in range(5):
        Fast((Grant(rule="r", rules=(PortRuleHTTP(path="/.*"),)),)).request(REQUEST)
        assert len(http_parser._VERDICTS) <= 2


def test_header_blocks_are_kept_without_secrets_and_bounded(monkeypatch):
    """A head's header block is looked up by its bytes: kept when it repeats, never when
    it carries a secret (the key would keep it), never past its bounds."""
    f = Fast(ALLOW_X)
    assert f.request(REQUEST) and f.response(RESPONSE)
    assert b"Host: svc:80\r\nUser-Agent: wrk\r\n" in http_parser._HEAD_BLOCKS
    secret = b"GET /x HTTP/1.1\r\nHost: svc\r\nAuthorization: Bearer s3cret\r\n\r\n"
    for _ in range(2):
        assert f.request(secret) is True
        assert f.records[-1]["l7"]["http"]["headers"][-1] == {"key": "Authorization",
                                                              "value": "[redacted]"}
        f.conn.pending.clear()
    assert not any(b"s3cret" in block for block in http_parser._HEAD_BLOCKS)
    long_block = b"X-Long: %s\r\n" % (b"v" * http_parser.HEAD_BLOCK_MAX)
    assert f.request(b"GET /x HTTP/1.1\r\n%b\r\n" % long_block) is True
    assert long_block not in http_parser._HEAD_BLOCKS
    f.conn.pending.clear()
    monkeypatch.setattr(http_parser, "HEAD_BLOCK_CACHE", 3)
    for n in range(6):
        assert f.request(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-N: %d\r\n\r\n" % n)
        assert f.response(b"HTTP/1.1 200 OK\r\nX-M: %d\r\nContent-Length: 0\r\n\r\n" % n)
        assert len(http_parser._HEAD_BLOCKS) <= 3
        assert f.records[-2]["l7"]["http"]["headers"][-1] == {"key": "X-N", "value": str(n)}
        assert f.records[-1]["l7"]["http"]["headers"][0] == {"key": "X-M", "value": str(n)}


@pytest.mark.parametrize("data", [
    b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",                  # asterisk form
    b"GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n",         # absolute form
    b"GET /x\r\nHost: h\r\n\r\n",                          # no version (HTTP/0.9)
])
def test_request_lines_the_fast_path_leaves_even_when_everything_is_allowed(data):
    f = Fast((Grant(rule="r", allow_all=True),))
    for _ in range(2):  # the second from the verdict cache
        assert f.request(data) is False
        assert f.records == [] and not f.conn.pending and f.conn.req_messages is None
    g = Drive((Grant(rule="r", allow_all=True),))
    d = Drive((Grant(rule="r", allow_all=True),))
    assert d.conn.fast_paths()[0](data) is None
    g.feed(False, data)
    d.feed(False, data)
    assert (d.upstream, d.client, d.closed, d.records) == (g.upstream, g.client, g.closed,
                                                           g.records)


def test_requests_after_empty_lines_never_share_a_cached_verdict():
    """llhttp skips empty lines before a request line: the bytes before the first CRLF
    are then no request line, and must not key a verdict another request would find."""
    f = Fast(ALLOW_X)
    for data in (b"\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n",
                 b"\r\nDELETE /secret HTTP/1.1\r\nHost: h\r\n\r\n"):
        assert f.request(data) is False  # the general path judges it
        ops = f.conn.on_data(False, data, False)
        f.conn.pending.clear()
    assert f.records[-1]["verdict"] == "DROPPED"
    assert f.records[-1]["l7"]["http"]["method"] == "DELETE"
    assert ops[0].type.name == "DROP" and any(op.data == FORBIDDEN for op in ops)


@pytest.mark.parametrize("response", [
    b"\r\n" + RESPONSE,                                       # an empty line first
    b"RTSP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n",     # not HTTP
])
def test_status_lines_the_fast_path_leaves_to_the_general_path(response):
    f = Fast(ALLOW_X)
    assert f.request(REQUEST) is True
    assert f.response(response) is False
    assert len(f.records) == 1 and len(f.conn.pending) == 1


def test_a_head_found_again_is_taken_only_with_the_body_length_it_had():
    """A head judged once is found by its bytes, and with a body of the length llhttp
    framed the first time it is one whole message; a read of that head with less or more
    than that body is parsed, declined, and the general path handles it as before."""
    post = b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 3\r\n\r\n"
    f = Fast(ALLOW_X)
    assert f.request(post + b"body") and f.response(response + b"ok\n")
    assert post in f.conn._heads and response in http_parser._RESPONSE_HEADS
    assert f.request(post + b"BODY") and f.response(response + b"OK\n")  # found again
    for data in (post + b"bo", post + b"body" + post + b"body", post, post + b"body!"):
        assert f.request(data) is False
        assert not f.conn.pending and f.conn.req_messages is None
        g, d = Drive(ALLOW_X), Drive(ALLOW_X)
        d.conn.fast_paths()[0](post + b"body")  # the head is found again: the same
        d.conn.pending.clear()
        d.records.clear()
        g.feed(False, data)
        d.feed(False, data)
        assert (d.upstream, d.client, d.closed, d.records) == (g.upstream, g.client,
                                                               g.closed, g.records)
    for data in (response + b"ok", response + b"ok\n" + response, response):
        assert f.request(REQUEST) is True
        assert f.response(data) is False
        assert len(f.conn.pending) == 1 and f.conn.resp_messages is None
        f.conn.pending.clear()
    records = [r for r in f.records if r["reply"]]
    assert len(records) == 2 and _without_latency(records[:1]) == _without_latency(records[1:])


def test_a_head_without_a_body_is_found_again_whatever_came_before():
    """A 204 / 304 has no body whatever its Content-Length says, and llhttp frames it so:
    the head is kept with the body length it had (none), not the one it names."""
    not_modified = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
    f = Fast(ALLOW_X)
    for _ in range(2):
        assert f.request(REQUEST) is True
        assert f.response(not_modified) is True
    assert http_parser._RESPONSE_HEADS[not_modified][1] == 0
    assert f.request(REQUEST) is True
    assert f.response(not_modified + b"0123456789") is False  # not one whole response
    assert [r["l7"]["http"]["code"] for r in f.records if r["reply"]] == [304, 304]


def test_heads_with_secrets_are_never_kept_and_the_head_caches_stay_bounded(monkeypatch):
    f = Fast((Grant(rule="r", rules=(PortRuleHTTP(path="/x"),)),))  # its own head cache
    secret = b"GET /x HTTP/1.1\r\nHost: svc\r\nCookie: s3cret\r\n\r\n"
    set_cookie = b"HTTP/1.1 200 OK\r\nSet-Cookie: s3cret\r\nContent-Length: 0\r\n\r\n"
    for _ in range(2):  # judged and recorded each time, never kept
        assert f.request(secret) and f.response(set_cookie)
    assert not any(b"s3cret" in head for head in f.conn._heads)
    assert not any(b"s3cret" in head for head in http_parser._RESPONSE_HEADS)
    assert b"s3cret" not in f.conn._last_request[0] + f.conn._last_response[0]
    assert [h["value"] for r in f.records for h in r["l7"]["http"]["headers"]
            if h["key"].lower() in ("cookie", "set-cookie")] == ["[redacted]"] * 4
    long_head = b"GET /x HTTP/1.1\r\nHost: svc\r\nX-L: %b\r\n\r\n" % (
        b"v" * http_parser.HEAD_BLOCK_MAX)
    assert f.request(long_head) and long_head not in f.conn._heads
    f.conn.pending.clear()
    monkeypatch.setattr(http_parser, "VERDICT_CACHE", 2)
    monkeypatch.setattr(http_parser, "HEAD_BLOCK_CACHE", 2)
    for n in range(5):  # (heads no other test made)
        assert f.request(b"GET /x HTTP/1.1\r\nHost: svc\r\nX-B: %d\r\n\r\n" % n)
        assert f.response(b"HTTP/1.1 200 OK\r\nX-B: %d\r\nContent-Length: 0\r\n\r\n" % n)
        assert len(f.conn._heads) <= 2 and len(http_parser._RESPONSE_HEADS) <= 2
        assert f.records[-2]["l7"]["http"]["headers"][-1]["value"] == str(n)
        assert f.records[-1]["l7"]["http"]["headers"][0]["value"] == str(n)


def test_a_denied_head_is_never_taken_after_an_allowed_one_with_the_same_line():
    """The head is the key: another Host, another header a rule looks at, is another
    request, judged on its own."""
    grants = (Grant(rule="h", rules=(PortRuleHTTP(path="/x", host="svc",
                                                  headers=("X-Token: 1",)),)),)
    f = Fast(grants)
    allowed = b"GET /x HTTP/1.1\r\nHost: svc\r\nX-Token: 1\r\n\r\n"
    assert f.request(allowed) is True
    f.conn.pending.clear()
    for denied in (b"GET /x HTTP/1.1\r\nHost: svc\r\nX-Token: 2\r\n\r\n",
                   b"GET /x HTTP/1.1\r\nHost: evil\r\nX-Token: 1\r\n\r\n",
                   b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"):
        for _ in range(2):
            assert f.request(denied) is False
            assert not f.conn.pending
    assert f.request(allowed) is True


@pytest.mark.parametrize("extra", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_empty_lines_after_a_whole_message_are_left_to_the_general_path(extra):
    """llhttp skips empty lines before a next message, so a read of one whole message and
    then empty lines is one message to it: the fast path leaves that read to the general
    path (which forwards the message and keeps the rest), and never takes those bytes for
    the body a head found again would have."""
    post = b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nab"
    f = Fast(ALLOW_X)
    for request in (REQUEST, post):
        assert f.request(request) is True  # (the head kept)
        f.conn.pending.clear()
        assert f.request(request + extra) is False
        assert not f.conn.pending
        g, d = Drive(ALLOW_X), Drive(ALLOW_X)
        assert d.conn.fast_paths()[0](request + extra) is None
        g.feed(False, request + extra)
        d.feed(False, request + extra)
        assert d.upstream == g.upstream == request
        assert (d.client, d.closed, d.records) == (g.client, g.closed, g.records)
    assert f.request(REQUEST) is True
    assert f.response(RESPONSE) is True  # (the head kept)
    assert f.request(REQUEST) is True
    assert f.response(RESPONSE + extra) is False
    assert len(f.conn.pending) == 1


def test_what_the_fast_paths_take_the_general_path_forwards_alike():
    """Mutated requests and responses (seeded), through one connection's fast paths with
    their caches warm: every read a fast path takes, the general path on a fresh
    connection forwards whole, with the same records (latency aside)."""
    rnd = random.Random(11)
    requests = [REQUEST, b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\nbody",
                b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                b"HEAD /x HTTP/1.1\r\nHost: svc\r\n\r\n", b"GET /y HTTP/1.1\r\n\r\n"]
    responses = [RESPONSE, b"HTTP/1.1 204 No Content\r\n\r\n",
                 b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"]
    pieces = [b"\r", b"\n", b" ", b":", b"0", b"9", b"a", b"\t", b"\r\n", b"\r\n\r\n", b"/",
              b"Content-Length: 2\r\n", b"Transfer-Encoding: chunked\r\n"]

    def mutated(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(out))
            choice = rnd.randrange(3)
            if choice == 0:
                del out[at]
            elif choice == 1:
                out[at:at] = rnd.choice(pieces)
            else:
                out += rnd.choice(pieces)
        return bytes(out)

    f = Fast(ALLOW_X)
    taken = [0, 0]
    for _ in range(3000):
        request, response = rnd.choice(requests), rnd.choice(responses)
        if rnd.random() < 0.5:
            request = mutated(request)
        if rnd.random() < 0.5:
            response = mutated(response)
        f.records.clear()
        f.conn.pending.clear()
        if not f.request(request):
            continue
        took_response = f.response(response)
        taken[0] += 1
        taken[1] += took_response
        g = Drive(ALLOW_X)
        g.conn.req_stream = g.conn.resp_stream = None  # no stream parser: the head parser
        g.feed(False, request)
        assert (g.upstream, g.client, g.closed) == (request, b"", False), request
        if took_response:
            g.feed(True, response)
            assert (g.client, g.closed) == (response, False), (request, response)
        general = [{"reply": bool(r.pop("is_reply", False)), **r} for r in g.records]
        assert _without_latency(f.records) == _without_latency(general[:len(f.records)])
        assert len(f.records) == 1 + took_response
    assert min(taken) > 300  # (the fast paths took many, mutated ones among them)


def test_a_connection_finds_the_heads_it_repeats_by_their_first_bytes_until_a_push():
    """The heads a connection's fast paths last found are compared first: a repeated
    message costs no lookup, a different one (or the same head with another body length)
    is looked up as before, and a policy push forgets the request's."""
    grants = (Grant(rule="r", rules=(PortRuleHTTP(method="GET|POST", path="/x"),)),)
    f = Fast(grants)
    post = b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\n"
    for _ in range(3):
        assert f.request(REQUEST) and f.response(RESPONSE)
    assert f.conn._last_request[0] == REQUEST
    assert f.conn._last_response[0] == RESPONSE[:RESPONSE.index(b"\r\n\r\n") + 4]
    assert f.request(REQUEST + REQUEST) is False  # the head, then more than its body
    assert f.conn.req_messages is None and not f.conn.pending
    for _ in range(3):
        assert f.request(post + b"ab") is True
        f.conn.pending.clear()
    assert f.conn._last_request[0] == post
    assert f.request(post + b"a") is False and f.request(post + b"abc") is False
    assert f.request(REQUEST) is True
    assert f.response(RESPONSE + b"!") is False and len(f.conn.pending) == 1
    f.conn.pending.clear()
    requests = [r for r in f.records if not r["reply"]]
    assert [r["l7"]["http"]["method"] for r in requests] == ["GET"] * 3 + ["POST"] * 3 + ["GET"]
    f.grants = (Grant(rule="other", rules=(PortRuleHTTP(path="/y"),)),)  # a push
    assert f.request(REQUEST) is False
    assert f.conn._last_request is http_parser._NO_HEAD
