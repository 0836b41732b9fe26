"""The L7 proxy process with real sockets: a client netns, the proxy in a router netns
behind a TPROXY rule (transparent: the proxy sees the original destination), a real HTTP
server behind it. The `l7_http` backend feeds it the policy, as the agent does."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time

import pytest
from pylium.datapath.marks import mark_encode_identity
from pylium.policy.http import HeaderMatch, PortRuleHTTP
from pylium.policy.resolve import L7Grant

from .conftest import CLIENT_ID, SERVER_ID, http_rules
from .topology import CLIENT_IP, EGRESS_DPORT, INGRESS_DPORT, REFUSED_DPORT, SERVER_IP

FORBIDDEN_BODY = b"Access denied\r\n"
#: a key redirected for another rule's HTTP rules, where one rule allows the port at L4
#: only: every request passes (Cilium's semantics for an L7-less allow on the same port)
ALLOW_ALL = (L7Grant("test/l4-only[0]", allow_all=True),
             L7Grant("test/l7[0]", "http", (PortRuleHTTP(path="/unused"),)))


def curl(topo, *args: str, port: int = INGRESS_DPORT, path: str = "/") -> tuple[int, str]:
    out = topo.ns(topo.client, "curl", "-s", "-o", "/dev/stdout", "-w", "|%{http_code}",
                  "--max-time", "20", *args, f"http://{SERVER_IP}:{port}{path}", check=False)
    body, _, code = out.stdout.rpartition("|")
    return int(code or 0), body


class Reader:
    """Responses off one client socket, in order (pipelined ones may arrive together)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        piece = self.sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed after {self.buf!r}")
        self.buf += piece

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    return Reader(sock).response()


def request(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: deathstar\r\n{extra}\r\n".encode()


def seen_paths(server) -> list[str]:
    return [r["path"] for r in server.seen()]


@pytest.fixture
def landing(agent):
    """The Star Wars rule: POST /v1/request-landing only, from the client identity."""
    agent.apply(ingress={CLIENT_ID: http_rules(PortRuleHTTP(method="POST",
                                                            path="/v1/request-landing"))})
    return agent


def test_allowed_lands_denied_gets_403_access_denied(topo, server, landing):
    code, body = curl(topo, "-X", "POST", path="/v1/request-landing")
    assert (code, body) == (200, "ok POST /v1/request-landing 0\n")
    sock = topo.connect()
    try:
        sock.sendall(request("PUT", "/v1/exhaust-port"))
        raw = b""
        while not raw.endswith(b"Access denied\r\n"):
            raw += sock.recv(4096)
    finally:
        sock.close()
    assert raw == (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\n"
                   b"content-type: text/plain\r\n\r\nAccess denied\r\n")
    assert "/v1/exhaust-port" not in seen_paths(server)
    # the transparent socket kept the addresses: the flow names the real client and server
    time.sleep(0.3)
    flows = [f for f in landing.flows.items if f["l7"]["type"] == "REQUEST"]
    denied = [f for f in flows if f["verdict"] == "DROPPED"][-1]
    assert (denied["src_ip"], denied["dst_ip"], denied["dport"]) == (CLIENT_IP, SERVER_IP, 80)
    assert (denied["src_identity"], denied["dst_identity"]) == (CLIENT_ID, SERVER_ID)
    assert denied["l7"]["http"]["method"] == "PUT"
    response = [f for f in landing.flows.items if f["l7"]["type"] == "RESPONSE"][-1]
    assert response["l7"]["http"]["code"] == 200 and response["l7"]["latency_ns"] > 0
    assert response["is_reply"] and response["src_ip"] == SERVER_IP
    assert landing.metric("pylium_policy_l7_total", {"rule": "denied", "protocol": "http"}) >= 1
    assert landing.metric("hubble_http_requests_total", {
        "method": "POST", "protocol": "HTTP/1.1", "status": "200", "reporter": "server"}) >= 1
    assert landing.metric("pylium_proxy_redirects", {"protocol": "http"}) == 2


def test_other_identities_are_denied(topo, server, agent):
    agent.apply(ingress={CLIENT_ID + 1: http_rules(PortRuleHTTP())})
    code, body = curl(topo, path="/anything")
    assert (code, body.strip()) == (403, "Access denied")


def test_header_and_host_rules(topo, server, agent):
    agent.apply(ingress={0: http_rules(
        PortRuleHTTP(path="/h", headers=("X-Has-Force: true",)),
        PortRuleHTTP(path="/host", host="deathstar(\\.empire)?"),
        PortRuleHTTP(path="/m", header_matches=(HeaderMatch("X-Ship", "tie"),)))})
    assert curl(topo, "-H", "X-Has-Force: true", path="/h")[0] == 200
    assert curl(topo, "-H", "X-Has-Force: false", path="/h")[0] == 403
    assert curl(topo, path="/h")[0] == 403
    assert curl(topo, "-H", "Host: deathstar.empire", path="/host")[0] == 200
    assert curl(topo, "-H", "Host: alderaan", path="/host")[0] == 403
    assert curl(topo, "-H", "X-Ship: tie", path="/m")[0] == 200
    assert curl(topo, "-H", "X-Ship: xwing", path="/m")[0] == 403


def test_egress_rules_judge_the_client_side_endpoint(topo, server, agent):
    agent.apply(egress={SERVER_ID: http_rules(PortRuleHTTP(method="GET", path="/out"))})
    assert curl(topo, port=EGRESS_DPORT, path="/out")[0] == 200
    assert curl(topo, port=EGRESS_DPORT, path="/elsewhere")[0] == 403
    assert curl(topo, path="/out")[0] == 403  # no ingress policy pushed: nothing allowed
    time.sleep(0.3)
    egress = [f for f in agent.flows.items if f["l7"]["type"] == "REQUEST"
              and f.get("proxy_port") == 10081][-1]
    assert egress["direction"] == 1 and egress["ep_id"] == 2


def test_keep_alive_mixes_allowed_and_denied_and_a_policy_change_applies_next(topo, server,
                                                                              agent):
    agent.apply(ingress={0: http_rules(PortRuleHTTP(method="GET", path="/ok.*"))})
    sock = topo.connect()
    try:
        for path, want in (("/ok1", 200), ("/no", 403), ("/ok2", 200), ("/no2", 403),
                           ("/ok3", 200)):
            sock.sendall(request("GET", path))
            status, _, body = read_response(sock)
            assert status == want, path
            assert body == (FORBIDDEN_BODY if want == 403 else f"ok GET {path} 0\n".encode())
        agent.apply(ingress={0: http_rules(PortRuleHTTP(method="GET", path="/new"))})
        sock.sendall(request("GET", "/ok4"))
        assert read_response(sock)[0] == 403  # same connection, the new policy
        sock.sendall(request("GET", "/new"))
        assert read_response(sock)[0] == 200
    finally:
        sock.close()
    assert "/no" not in seen_paths(server) and "/ok4" not in seen_paths(server)


def test_pipelined_requests_answer_in_order(topo, server, agent):
    agent.apply(ingress={0: http_rules(PortRuleHTTP(method="GET", path="/p[0-9]"))})
    sock = topo.connect()
    try:
        paths = ["/p1", "/deny1", "/p2", "/p3", "/deny2", "/p4"]
        sock.sendall(b"".join(request("GET", p) for p in paths))
        reader = Reader(sock)
        got = [reader.response()[::2] for _ in paths]
        assert [s for s, _ in got] == [200, 403, 200, 200, 403, 200]
        assert got[2][1] == b"ok GET /p2 0\n"
    finally:
        sock.close()


def proxy_pid(agent) -> int:
    return int(agent.backend.status()["pid"])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_100mb_chunked_upload_streams_with_flat_memory(topo, server, agent):
    agent.apply(ingress={0: http_rules(PortRuleHTTP(method="POST", path="/upload"))})
    pid = proxy_pid(agent)
    size = 100 * 1024 * 1024
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = topo.ns(topo.client, "sh", "-c",
                      f"head -c {size} /dev/zero | curl -s --max-time 120 -X POST "
                      "-H 'Transfer-Encoding: chunked' --data-binary @- "
                      f"http://{SERVER_IP}/upload", timeout=150)
    finally:
        done.set()
        sampler.join()
    assert out.stdout == f"ok POST /upload {size}\n"
    seen = [r for r in server.seen() if r["path"] == "/upload"][-1]
    assert seen["body_size"] == size
    assert seen["body_sha256"] == hashlib.sha256(b"\0" * size).hexdigest()
    grown = peak[0] - before
    print(f"proxy RSS {before} KiB before, peak {peak[0]} KiB during a {size >> 20} MiB upload")
    assert grown < 16 * 1024, f"proxy RSS grew {grown} KiB during the upload"


def test_content_length_upload_and_expect_100_continue(topo, server, agent):
    agent.apply(ingress={0: http_rules(PortRuleHTTP(method="PUT"))})
    size = 5 * 1024 * 1024
    out = topo.ns(topo.client, "sh", "-c",
                  f"head -c {size} /dev/urandom > /tmp/l7-proxy-up.$$ && curl -s -X PUT "
                  "-H 'Expect: 100-continue' --data-binary @/tmp/l7-proxy-up.$$ "
                  f"http://{SERVER_IP}/put; rm -f /tmp/l7-proxy-up.$$")
    assert out.stdout == f"ok PUT /put {size}\n"
    sock = topo.connect()
    try:  # denied with Expect: the 403 comes at once, the body is never asked for
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 1000000\r\n\r\n")
        status, headers, body = read_response(sock)
        assert (status, body, headers.get("connection")) == (403, FORBIDDEN_BODY, "close")
    finally:
        sock.close()


@pytest.mark.parametrize("raw", [
    b"GET /smuggle HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\n",
    b"GARBAGE /malformed\r\n\r\n",
    b"GET /malformed2 HTTP/1.1\r\nNo colon here\r\n\r\n",
])
def test_malformed_request_gets_400_and_the_server_never_sees_it(topo, server, agent, raw):
    agent.apply(ingress={0: ALLOW_ALL})
    sock = topo.connect()
    try:
        sock.sendall(raw)
        status, headers, _ = read_response(sock)
        assert status == 400 and headers.get("connection") == "close"
        assert sock.recv(10) == b""  # closed after the 400
    finally:
        sock.close()
    assert not {"/smuggle", "/malformed", "/malformed2"} & set(seen_paths(server))


def test_upstream_refused_is_503_with_a_reason(topo, server, agent):
    agent.apply(ingress={0: ALLOW_ALL})
    code, body = curl(topo, port=REFUSED_DPORT, path="/nobody-home")
    assert code == 503
    assert body == "upstream connect error: connection refused\n"


def test_client_and_server_resets_leave_the_proxy_serving(topo, server, agent):
    agent.apply(ingress={0: ALLOW_ALL})
    # client reset in the middle of a request body
    sock = topo.connect()
    sock.sendall(b"POST /half HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nabc")
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # server reset: the client sees its connection end, not a hang
    sock = topo.connect()
    try:
        sock.sendall(request("GET", "/reset"))
        with pytest.raises((ConnectionError, OSError)):
            read_response(sock)
    finally:
        sock.close()
    assert curl(topo, path="/after-resets")[0] == 200
    time.sleep(0.2)
    status = agent.call(agent.backend.supervisor.refresh())
    assert status["active_connections"] == 0


def test_upstream_carries_the_client_identity_mark(topo, server, agent):
    agent.apply(ingress={0: ALLOW_ALL})
    mark = mark_encode_identity(CLIENT_ID)
    topo.ns(topo.router, "iptables", "-t", "mangle", "-A", "OUTPUT", "-d", SERVER_IP, "-p",
            "tcp", "--dport", "80", "--syn", "-m", "mark", "--mark", hex(mark))
    try:
        assert curl(topo, path="/marked")[0] == 200
        out = topo.ns(topo.router, "iptables", "-t", "mangle", "-L", "OUTPUT", "-v", "-n",
                      "-x").stdout
        counted = [line.split() for line in out.splitlines() if f"mark match {hex(mark)}"
                   in line]
        assert counted and int(counted[0][0]) >= 1, out
    finally:
        topo.ns(topo.router, "iptables", "-t", "mangle", "-F", "OUTPUT")


def test_a_dead_proxy_serves_no_port_until_it_is_respawned_with_the_policy(topo, server,
                                                                            agent):
    agent.apply(ingress={0: http_rules(PortRuleHTTP(path="/again"))})
    old = proxy_pid(agent)
    assert agent.backend.served_ports() == {10080, 10081}
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while agent.backend.served_ports() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.backend.served_ports() == set()  # fail closed: the redirects load as deny
    deadline = time.monotonic() + 20
    while not agent.backend.served_ports() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.backend.served_ports() == {10080, 10081}
    assert proxy_pid(agent) != old
    # the respawned proxy got the last policy back
    assert curl(topo, path="/again")[0] == 200
    assert curl(topo, path="/not-again")[0] == 403


def test_large_response_to_a_slow_client_keeps_the_proxy_small(topo, server, agent):
    agent.apply(ingress={0: ALLOW_ALL})
    pid = proxy_pid(agent)
    size = 64 * 1024 * 1024
    before = rss_kib(pid)
    sock = topo.connect(timeout=60)
    try:
        sock.sendall(request("GET", f"/big/{size}"))
        time.sleep(1.5)  # the client reads nothing: the server must be held back, not us
        stalled = rss_kib(pid)
        got = 0
        while got < size + 40:
            piece = sock.recv(1 << 20)
            if not piece:
                break
            got += len(piece)
    finally:
        sock.close()
    assert got > size
    print(f"proxy RSS {before} KiB before, {stalled} KiB with a stalled 64 MiB download")
    assert stalled - before < 16 * 1024


def test_many_busy_connections_each_get_their_own_answers_in_order(topo, server, agent):
    """128 keep-alive connections sending at once, round after round (the proxy's writes
    may then wait for the end of its event-loop round, `ROUND_BATCH`): every connection
    gets exactly its own responses, in order, denied ones included, and every request and
    response is a flow."""
    agent.apply(ingress={0: http_rules(PortRuleHTTP(method="GET", path="/c.*"))})
    agent.flows.clear()
    socks = [topo.connect() for _ in range(128)]
    try:
        readers = [Reader(sock) for sock in socks]
        for round_ in range(10):
            paths = [f"/c{i}-{round_}" if i % 4 else f"/d{i}-{round_}"
                     for i in range(len(socks))]
            for sock, path in zip(socks, paths, strict=True):
                # a denied request with an allowed one pipelined behind it: both answered
                sock.sendall(request("GET", path) if path.startswith("/c") else
                             request("GET", path) + request("GET", f"/c{path[2:]}"))
            for reader, path in zip(readers, paths, strict=True):
                status, _, body = reader.response()
                if path.startswith("/c"):
                    assert (status, body) == (200, f"ok GET {path} 0\n".encode())
                else:
                    assert (status, body) == (403, FORBIDDEN_BODY)
                    status, _, body = reader.response()
                    assert (status, body) == (200, f"ok GET /c{path[2:]} 0\n".encode())
    finally:
        for sock in socks:
            sock.close()
    denied = 10 * 32
    want = 10 * 128 + denied  # requests: every connection's, and the pipelined ones
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with agent.flows.lock:
            kinds = [f["l7"]["type"] for f in agent.flows.items]
        if kinds.count("REQUEST") >= want and kinds.count("RESPONSE") >= want - denied:
            break
        time.sleep(0.05)
    assert kinds.count("REQUEST") == want
    assert kinds.count("RESPONSE") == want - denied  # a denied request has no response record
    assert not any(p.startswith("/d") for p in seen_paths(server))
