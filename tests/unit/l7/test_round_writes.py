"""The proxy's fast-path writes at the end of an event-loop round (`ROUND_BATCH`): every
byte still goes out, in order per connection side, whatever else the round did to the
connection; a round with few connections makes the next messages go out at once again."""

from __future__ import annotations

import asyncio

from pylium.l7 import proxy as proxy_module
from pylium_l7_http.parser import HttpParserFactory

from tests.unit.l7.test_http_fast_path import REQUEST, RESPONSE
from tests.unit.l7.test_http_parser import FORBIDDEN

POLICY = {"endpoints": [{"ipv4": "10.0.0.2", "ep_id": 1, "identity": 1000, "entries": [
    {"identity": 0, "direction": "ingress", "port": 80, "port_prefix_len": 16,
     "grants": [{"rule": "r", "kind": "http", "rules": [{"method": "GET", "path": "/x"}]}]}]}]}
DENIED = b"GET /no HTTP/1.1\r\nHost: svc:80\r\n\r\n"


class Sock:
    def __init__(self, port):
        self.port = port

    def setsockopt(self, *a):
        pass

    def getsockname(self):
        return ("10.0.0.2", 80)

    def getpeername(self):
        return ("10.0.0.1", self.port)


class Transport:
    """Records every write, in the order the proxy made them across all transports."""

    def __init__(self, log, name, port=0):
        self.log, self.name, self.port = log, name, port
        self.data = b""
        self.closed = self.aborted = False

    def get_extra_info(self, name):
        return Sock(self.port)

    def write(self, data):
        self.data += data
        self.log.append(self.name)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def _proxy(tmp_path, connections):
    p = proxy_module.Proxy(tmp_path, HttpParserFactory(), {"ingress": 1}, "0")
    p.policy.load(POLICY)
    log: list[str] = []
    conns = []
    for i in range(connections):
        conn = proxy_module.Connection(p, "ingress", 1, Transport(log, f"down{i}", 40000 + i))
        conn.up, conn.up_state = Transport(log, f"up{i}"), "open"
        conns.append(conn)
    return p, conns, log


def test_a_busy_round_writes_at_its_end_and_a_quiet_one_switches_back(tmp_path):
    async def run():
        p, conns, log = _proxy(tmp_path, proxy_module.ROUND_BATCH)
        assert p.round_writes is False  # at first: each message at once
        conns[0].received(conns[0].request, REQUEST)
        assert conns[0].up.data == REQUEST
        # every ROUND_PROBE messages, one round's writes wait to be counted
        p.until_probe = 1
        conns[0].received(conns[0].reply, RESPONSE)
        assert conns[0].down.data == RESPONSE and p.round_writes is True
        log.clear()
        for conn in conns:  # a busy round: ROUND_BATCH connections
            conn.received(conn.request, REQUEST)
        assert log == [] and len(p.in_round) == len(conns)
        await asyncio.sleep(0)  # the round ends
        assert log == [f"up{i}" for i in range(len(conns))]
        assert all(conn.up.data.endswith(REQUEST) for conn in conns)
        assert p.round_writes is True and not p.in_round
        assert p.describe()["stats"]["write_rounds"] == 1  # (counted in the proxy stats)
        for conn in conns:  # the responses, and a second request on one connection
            conn.received(conn.reply, RESPONSE)
        conns[1].received(conns[1].request, REQUEST)
        await asyncio.sleep(0)
        assert conns[1].up.data == REQUEST * 2 and conns[1].down.data == RESPONSE
        assert p.round_writes is True
        conns[1].received(conns[1].reply, RESPONSE)  # a quiet round: one connection
        assert conns[1].down.data == RESPONSE
        await asyncio.sleep(0)
        assert conns[1].down.data == RESPONSE * 2 and p.round_writes is False
        conns[1].received(conns[1].request, REQUEST)  # at once again
        assert conns[1].up.data == REQUEST * 3
        records = p.batch
        assert len(records) == 2 + 2 * len(conns) + 3  # every message recorded
    asyncio.run(run())


def test_messages_waiting_for_the_round_go_before_what_the_general_path_writes(tmp_path):
    """A response waiting for the round's end, then a denied request's 403 on the same
    connection in the same round: the client gets them in that order (and the 403's
    event writes both at once)."""
    async def run():
        p, (conn,), log = _proxy(tmp_path, 1)
        p.round_writes = True
        conn.received(conn.request, REQUEST)
        conn.received(conn.reply, RESPONSE)
        assert conn.down.data == b"" and conn.in_round
        conn.received(conn.request, DENIED)  # the general path: written at its event's end
        assert conn.down.data == RESPONSE + FORBIDDEN and conn.up.data == REQUEST
        assert not conn.in_round
        await asyncio.sleep(0)  # nothing is written twice
        assert conn.down.data == RESPONSE + FORBIDDEN and conn.up.data == REQUEST
    asyncio.run(run())


def test_a_connection_closed_in_the_round_sends_what_waited_unless_aborted(tmp_path):
    async def run():
        p, (closed, aborted), log = _proxy(tmp_path, 2)
        p.round_writes = True
        for conn in (closed, aborted):
            conn.received(conn.request, REQUEST)
        closed.close()
        aborted.close(abort=True)
        assert closed.up.data == REQUEST and closed.up.closed
        assert aborted.up.data == b"" and aborted.up.aborted
        await asyncio.sleep(0)
        assert closed.up.data == REQUEST and aborted.up.data == b""
        assert not p.in_round
    asyncio.run(run())
