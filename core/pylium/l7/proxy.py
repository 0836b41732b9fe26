"""The L7 proxy process: transparent listeners on the proxy ports, one protocol parser per
connection (`pylium.l7.parser`), policy pushed by the agent, flows sent back to it.

It runs as its own process (Cilium's Envoy DaemonSet model) so a `kill -9` of the agent cuts
no proxied connection: the policy it last received keeps being enforced, flows wait in a
bounded buffer, and the next agent adopts it over the control socket.

    python -m pylium.l7.proxy --state-dir DIR --parser MODULE:FACTORY \\
        --listen ingress:10080 --listen egress:10081 --version V [--ipcache PIN] [--detach] \\
        [--reuseport]
    python -m pylium.l7.proxy stop --state-dir DIR

Transparency: the listeners are IP_TRANSPARENT, so a connection the datapath steered here
(TPROXY or bpf_sk_assign) has the original destination as its local address and the client
as its peer. The upstream connection to that destination carries
`SO_MARK = mark_encode_identity(source identity)` so the destination's policy judges the
real client.

Several of these processes may share the ports (`--reuseport`, SO_REUSEPORT: the kernel
spreads new connections over them), each its own process with its own control socket and
state directory, fed the same policy (`pylium.l7.supervisor.ProxyPool`): Python runs one
core per process."""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import ipaddress
import json
import logging
import operator
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from pylium import gcpolicy
from pylium.datapath.marks import (
    MARK_MAGIC_IDENTITY,
    MARK_MAGIC_PROXY_EGRESS,
    MAX_MARK_IDENTITY,
    mark_encode_identity,
)
from pylium.l7.parser import (
    ConnectionInfo,
    ConnectionParser,
    FastPath,
    Grant,
    Op,
    OpType,
    ParserFactory,
    load_factory,
)
from pylium.policy.mapstate import Direction, PolicyKey

log = logging.getLogger("pylium.l7.proxy")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SO_MARK = getattr(socket, "SO_MARK", 36)
PIDFILE = "proxy.pid"
CONTROL_SOCKET = "proxy.sock"
LOGFILE = "proxy.log"
#: control protocol version: bumped when the messages change incompatibly
#: (2: flow records travel in batches, `{"op":"flows","flows":[...]}`; 3: a connection's
#: constant part travels once, `"conns":{"ID":[request base, reply base]}`, and each
#: record names it, `"c": ID*2+is_reply`; `"gone":[ID...]` once its records are all sent.
#: 4: a batch line is its head, `{"op":"flows","seq":FIRST,"c":[C...],"conns":..,
#: "gone":..}`, then each record's FIELDS after a RECORD_SEP: the members of its JSON
#: object without braces, as the parser made them; its seq is FIRST + its place, its C in
#: the head ID*2+is_reply for a parser's fast path (FORWARDED, no error), -(ID*2+is_reply)
#: for any other. No record is decoded to be taken: the agent keeps it as it came until
#: someone reads it.
#: 5: a record a fast path made in two parts (`pylium.l7.parser.FastRecord`) travels as
#: its rest only; the head's `"p":[P...]` names each record's prefix (-1: none, the record
#: is whole), and a prefix new to the agent travels once, after the head and before the
#: records, its number in the head's `"prefixes":[P...]` (`"prefixes_reset":true` first:
#: the agent forgets the ones it had; numbers are per agent connection).
#: `pylium.l7.supervisor` reads 5, and 2-4 of a proxy an older agent left running)
CONTROL_PROTOCOL = 5
#: separates a protocol 4 batch line's records (JSON never holds a raw control character)
RECORD_SEP = b"\x1e"
#: record prefixes numbered for one agent connection at most (then numbered afresh)
PREFIXES_MAX = 4096
WORLD = 2
PROTO_TCP = 6
#: flow records kept until an agent acknowledges them (oldest dropped first, counted lost)
FLOW_BUFFER = 20000
#: bytes of flow records queued to a connected agent before further ones are dropped
CONTROL_BACKLOG = 16 << 20
#: flow records per batch line at most (a re-sent backlog goes in several)
FLOW_BATCH = 1000
#: how long a flow record may wait for others to share its batch (seconds). Every batch
#: is a write here and a wake-up of the agent there, whose fixed cost (the event loop,
#: the syscalls, the caches the other processes left cold) outweighs a few records' own
#: under protocol 4 (~1-2 us each): a longer wait costs both processes less. Short enough
#: that the agent's work comes in small pieces: while it runs, the requests in flight wait
#: for the machine's other CPUs (bench_l7_http at 10 connections, ~60,000 requests/s on 2
#: cores: 10 ms batches, ~1.5 ms of agent CPU each, made a p99 of 1.4 ms; 5 ms ones 1.05
#: ms, the agent's CPU per record within its noise); and flows show at once to a person
#: watching.
FLOW_FLUSH_DELAY = 0.005
CONNECT_TIMEOUT = 5.0
#: per-direction bytes read ahead of the other side before reading pauses
HIGH_WATER = 1 << 20
#: connections with a whole message in one event-loop round from which the fast path's
#: writes wait for the round's end (`Proxy.write_round`): with many connections busy at
#: once, the writes that wake the processes at the other ends then go out together, and
#: each wakes once per round for all of them instead of once per message (a proxy at
#: 100 busy connections: ~60 per round, ~1/5 less CPU per request in the kernel). With
#: few (one client: one message per round) each write goes out at once: the wait would
#: only add the loop's scheduling (~1 us per message)
ROUND_BATCH = 16
#: fast-path messages written at once between two rounds that look again whether rounds
#: carry ROUND_BATCH connections (one round's writes are deferred to count them)
ROUND_PROBE = 256


# policy -------------------------------------------------------------------------------------

class PolicyTable:
    """The newest policy the agent pushed: per local endpoint IP, its redirected keys and
    the grants of each; and an IP -> identity table (LPM) for peers."""

    def __init__(self, factory: ParserFactory):
        self.factory = factory
        self.revision = 0
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.prefixes: dict[int, dict[int, int]] = {}  # prefixlen -> {network int: identity}
        self.ipcache_fd: int | None = None
        self.redirects = 0
        #: bumped by every load: connections cache their grants until it changes
        self.generation = 0

    def load(self, message: dict[str, Any]) -> list[str]:
        """Replace the table; returns problems (a grant whose rules cannot be enforced
        allows nothing)."""
        problems: list[str] = []
        endpoints = {}
        redirects = 0
        for ep in message.get("endpoints", []):
            entries = []
            for entry in ep.get("entries", []):
                key = PolicyKey(int(entry["identity"]), Direction[entry["direction"].upper()],
                                int(entry.get("protocol", PROTO_TCP)), int(entry.get("port", 0)),
                                int(entry.get("port_prefix_len", 0)))
                grants = []
                for g in entry.get("grants", []):
                    if g.get("allow_all"):
                        grants.append(Grant(rule=g.get("rule", ""), allow_all=True))
                        continue
                    if g.get("kind") != self.factory.protocol:
                        continue  # another protocol's rules allow nothing here
                    try:
                        rules = self.factory.rules_from_json(g.get("rules", []))
                    except (ValueError, TypeError) as exc:
                        problems.append(f"{g.get('rule', '?')}: {exc}")
                        continue
                    grants.append(Grant(rule=g.get("rule", ""), rules=rules))
                entries.append((key, tuple(grants)))
                redirects += 1
            endpoints[ep["ipv4"]] = {"ep_id": int(ep.get("ep_id", 0)),
                                     "identity": int(ep.get("identity", 0)),
                                     "entries": entries}
        prefixes: dict[int, dict[int, int]] = {}
        for cidr, identity in message.get("ipcache", []):
            net = ipaddress.IPv4Network(cidr, strict=False)
            prefixes.setdefault(net.prefixlen, {})[int(net.network_address)] = int(identity)
        self.endpoints, self.prefixes = endpoints, prefixes
        self.revision = int(message.get("revision", self.revision + 1))
        self.redirects = redirects
        self.generation += 1
        return problems

    def identity_of(self, ip: str) -> int:
        ep = self.endpoints.get(ip)
        if ep is not None and ep["identity"]:
            return ep["identity"]
        if self.ipcache_fd is not None:
            found = self._pinned_lookup(ip)
            if found is not None:
                return found
        value = int(ipaddress.IPv4Address(ip))
        for plen in sorted(self.prefixes, reverse=True):
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
            found = self.prefixes[plen].get(value & mask)
            if found is not None:
                return found
        return WORLD

    def _pinned_lookup(self, ip: str) -> int | None:
        from pylium.datapath.maps.base import BpfMap
        from pylium.datapath.maps.ipcache import IpcacheKey, RemoteEndpointInfo

        try:
            found = BpfMap(self.ipcache_fd, "ipcache", IpcacheKey, RemoteEndpointInfo,
                           owned=False).lookup(IpcacheKey.of(f"{ip}/32"))
        except Exception as exc:  # a broken pin must not stop the proxy: use the table
            log.warning("ipcache lookup of %s failed: %s", ip, exc)
            return None
        return int(found.identity) if found is not None else None

    def grants(self, direction: str, local_ip: str, peer_identity: int,
               port: int) -> tuple[Grant, ...] | None:
        """The grants of the key the datapath's lookup would pick (specific identity or
        wildcard, longest port prefix), or None when no redirected key covers it."""
        ep = self.endpoints.get(local_ip)
        if ep is None:
            return None
        want = Direction[direction.upper()]
        best: dict[int, tuple[PolicyKey, tuple[Grant, ...]]] = {}
        for key, grants in ep["entries"]:
            for identity in (peer_identity, 0):
                if key.identity == identity and key.matches(identity, want, PROTO_TCP, port):
                    slot = 0 if identity else 1
                    if slot not in best or key.lpm_prefixlen > best[slot][0].lpm_prefixlen:
                        best[slot] = (key, grants)
        chosen = best.get(0)
        wildcard = best.get(1)
        if wildcard is not None and (chosen is None
                                     or wildcard[0].lpm_prefixlen > chosen[0].lpm_prefixlen):
            chosen = wildcard
        return chosen[1] if chosen is not None else None


# connections --------------------------------------------------------------------------------

class Side:
    """Bytes of one direction not yet decided on, and the decision still running."""

    __slots__ = ("reply", "buf", "pass_left", "drop_left", "queue", "need_call", "eof",
                 "paused", "fast", "c")

    def __init__(self, reply: bool):
        self.reply = reply
        #: bytes as received (no copy) while one read is all there is; a bytearray once
        #: several reads must be joined
        self.buf: bytes | bytearray = b""
        self.pass_left = 0
        self.drop_left = 0
        self.queue: collections.deque[Op] = collections.deque()
        self.need_call = False
        self.eof = False
        self.paused = False
        #: the parser's fast path of this direction (`ConnectionParser.fast_paths`), if any
        self.fast: FastPath | None = None
        #: this direction's records' C (`CONTROL_PROTOCOL`: connection id * 2 + is_reply)
        self.c = 0


_PREFIX, _REST = operator.itemgetter(0), operator.itemgetter(1)


def _whole(record: bytes | tuple[bytes, bytes]) -> bytes:
    """A record as one bytes (a fast path may make it in two parts)."""
    return b"".join(record) if type(record) is tuple else record


def _append(side: Side, data: bytes) -> None:
    buf = side.buf
    if not buf:
        side.buf = data
    elif type(buf) is bytes:
        side.buf = bytearray(buf) + data
    else:
        buf += data


def _take(side: Side, n: int) -> bytes:
    """The first n buffered bytes, removed from the buffer (the buffer itself when it is
    taken whole: a request or response read in one piece is forwarded without a copy)."""
    buf = side.buf
    if n >= len(buf):
        side.buf = b""
        return buf if type(buf) is bytes else bytes(buf)
    if type(buf) is bytes:
        chunk = buf[:n]
        # many pipelined messages in one large read: cut from a bytearray (in place)
        side.buf = buf[n:] if len(buf) - n < 4096 else bytearray(buf[n:])
        return chunk
    chunk = bytes(buf[:n])
    del buf[:n]
    return chunk


class _Downstream(asyncio.Protocol):
    def __init__(self, proxy: Proxy, direction: str, port: int):
        self.proxy = proxy
        self.direction = direction
        self.port = port
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.conn = conn = Connection(self.proxy, self.direction, self.port, transport)
        # reads go straight to the connection (`_receiver`); the transport looks its
        # protocol's data_received up again when the protocol is set (uvloop keeps the one
        # it found then)
        self.data_received = _receiver(conn, conn.request)
        transport.set_protocol(self)

    def eof_received(self) -> bool:
        self.conn.eof(self.conn.request)
        return True

    def pause_writing(self) -> None:
        self.conn.pause_reading_of(self.conn.reply)

    def resume_writing(self) -> None:
        self.conn.resume_reading_of(self.conn.reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.lost(downstream=True, exc=exc)


def _receiver(conn: Connection, side: Side) -> Any:
    """A protocol's `data_received`: `conn.received(side, data)` for each read of `side`,
    without a Python frame of its own (a C partial: the hot path is one frame shorter)."""
    return functools.partial(conn.received, side)


class _Upstream(asyncio.Protocol):
    def __init__(self, conn: Connection):
        self.conn = conn
        self.data_received = _receiver(conn, conn.reply)  # before the transport exists

    def eof_received(self) -> bool:
        self.conn.eof(self.conn.reply)
        return True

    def pause_writing(self) -> None:
        self.conn.pause_reading_of(self.conn.request)

    def resume_writing(self) -> None:
        self.conn.resume_reading_of(self.conn.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(downstream=False, exc=exc)


class Connection:
    """One redirected connection: the client side, the upstream (opened when the parser
    first passes a byte), and the op engine of `pylium.l7.parser`."""

    def __init__(self, proxy: Proxy, direction: str, port: int,
                 transport: asyncio.Transport):
        self.proxy = proxy
        self.down = transport
        self.up: asyncio.Transport | None = None
        self.up_state = "none"  # none | connecting | open | failed | closed
        self.up_pending: list[bytes] = []
        self.request = Side(False)
        self.reply = Side(True)
        self.closed = False
        #: bytes decided during one event, written with one send per side at its end
        self.out_client: list[bytes] = []
        self.out_up: list[bytes] = []
        #: listed in `Proxy.in_round`: fast-path messages wait in out_* for the round's end
        self.in_round = False
        sock = transport.get_extra_info("socket")
        # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP: a head and
        # a body written separately must not wait for the client's delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dst_ip, dst_port = sock.getsockname()[:2]  # the original destination (transparent)
        src_ip, src_port = sock.getpeername()[:2]
        table = proxy.policy
        local_ip = dst_ip if direction == "ingress" else src_ip
        ep = table.endpoints.get(local_ip, {})
        self.info = ConnectionInfo(direction=direction, src_ip=src_ip, src_port=src_port,
                                   dst_ip=dst_ip, dst_port=dst_port,
                                   src_identity=table.identity_of(src_ip),
                                   dst_identity=table.identity_of(dst_ip),
                                   ep_id=ep.get("ep_id", 0), proxy_port=port)
        self.local_ip = local_ip
        self.peer_identity = (self.info.src_identity if direction == "ingress"
                              else self.info.dst_identity)
        client = {"ip": src_ip, "port": src_port, "identity": self.info.src_identity}
        server = {"ip": dst_ip, "port": dst_port, "identity": self.info.dst_identity}
        #: the connection's part of every flow record, per direction, encoded once: the
        #: JSON object without its closing brace (a record appends its own fields)
        #: the connection's id in flow records (`"c": cid*2+is_reply`), its part announced
        #: to the agent once (`Proxy.announce`)
        self.cid = proxy.new_flow_conn(
            (orjson.dumps(_flow_base(client, server, self.info, False)),
             orjson.dumps(_flow_base(server, client, self.info, True))))
        self.request.c, self.reply.c = self.cid * 2, self.cid * 2 + 1
        self._grants_cached: tuple[Grant, ...] | None = None
        self._grants_generation = -1
        self.parser: ConnectionParser = proxy.factory.new_connection(
            self.info, self._grants, self._emit)
        fast = self.parser.fast_paths()
        if fast is not None:
            self.request.fast, self.reply.fast = fast
        #: bytes buffered before reading pauses: a parser that decides on whole frames
        #: (Kafka) must see one whole, or reading would pause waiting for itself
        self.read_limit = max(HIGH_WATER, int(getattr(proxy.factory, "max_buffer", 0)))
        proxy.stats["connections"] += 1
        proxy.active.add(self)

    def _grants(self) -> tuple[Grant, ...] | None:
        """The grants of this connection's key, looked up again only after a policy
        push (every request asks)."""
        table = self.proxy.policy
        if self._grants_generation != table.generation:
            self._grants_cached = table.grants(self.info.direction, self.local_ip,
                                               self.peer_identity, self.info.dst_port)
            self._grants_generation = table.generation
        return self._grants_cached

    def _emit(self, record: dict[str, Any]) -> None:
        self.proxy.flow(self.cid * 2 + (1 if record.get("is_reply") else 0), record)

    # the op engine ------------------------------------------------------------------------
    def received(self, side: Side, data: bytes) -> None:
        if self.closed:
            return
        if not (side.buf or side.pass_left or side.drop_left or side.queue or side.eof
                or side.paused):
            fast = side.fast
            # one whole message, forwarded as read: its record first (`Proxy.add_record`,
            # inline but for a batch's first and last)
            if fast is not None and (fields := fast(data)) is not None:
                proxy = self.proxy
                proxy.seq += 1
                batch = proxy.batch
                if batch and len(batch) < FLOW_BATCH - 1:
                    batch.append(fields)
                    proxy.batch_c.append(side.c)
                else:
                    proxy.add_record(side.c, fields)
                if not side.reply:
                    proxy.fast_requests += 1
                if proxy.round_writes:  # at the round's end, with the other connections'
                    (self.out_client if side.reply else self.out_up).append(data)
                    if not self.in_round:
                        self.in_round = True
                        in_round = proxy.in_round
                        if not in_round:  # the round's first: its end is scheduled
                            asyncio.get_running_loop().call_soon(proxy.write_round)
                        in_round.append(self)
                else:
                    proxy.until_probe -= 1
                    if not proxy.until_probe:  # the next round's writes wait, counted
                        proxy.round_writes = True
                    if side.reply:
                        self.down.write(data)
                    elif self.up_state == "open":
                        self.up.write(data)
                    else:
                        self._write_upstream(data)
                other = self.request if side.reply else self.reply
                if other.buf:  # (rarely: the other direction waits with bytes)
                    self._unblock(other)
                return
            self._whole(side, data)
            return
        if side.buf or side.pass_left == 0 and side.drop_left == 0:
            _append(side, data)
        else:  # fast path: a streaming body goes straight through
            n = side.pass_left or side.drop_left
            head, rest = (data, b"") if n >= len(data) else (data[:n], data[n:])
            if side.pass_left:
                side.pass_left -= len(head)
                self._send(side, head)
            else:
                side.drop_left -= len(head)
            if rest:
                _append(side, rest)
        side.need_call = True
        self._run(side)
        self.flush()
        if len(side.buf) > self.read_limit:
            self.pause_reading_of(side)
        self._resume_drained()

    def _unblock(self, other: Side) -> None:
        """After a whole message went straight through: the other direction's buffered
        bytes may have waited for this decision (a response for its request)."""
        if other.buf and not (other.pass_left or other.drop_left or other.queue):
            other.need_call = True
            self._kick(other)
            self.flush()
            self._resume_drained()

    def _resume_drained(self) -> None:
        for each in (self.request, self.reply):
            if each.paused and len(each.buf) <= self.read_limit:
                self._resume_if_drained(each)

    def _whole(self, side: Side, data: bytes) -> None:
        """A read with nothing of this direction outstanding (the usual event: one whole
        request or response). The parser is asked once; a single PASS of the whole read
        goes straight out, without the op engine's buffering and queue. Anything else
        continues in the engine exactly as `_run` would after that call."""
        parser = self.parser
        ops = parser.on_data(side.reply, data, False)
        count = len(ops)
        if count == 1 or (count == 2 and ops[1].type is OpType.MORE and parser.boundary_more):
            op = ops[0]
            if op.type is OpType.PASS and op.n == len(data):
                if side.reply:
                    self.down.write(data)
                else:
                    self._write_upstream(data)
                if count == 1:
                    # a PASS that reached zero: the parser is called with no bytes (contract)
                    ops = parser.on_data(side.reply, b"", False)
                if count == 2 or (len(ops) == 1 and ops[0].type is OpType.MORE):
                    self._unblock(self.reply if side is self.request else self.request)
                    return
            else:
                side.buf = data
        else:
            side.buf = data
        side.need_call = bool(ops) and ops[-1].type is not OpType.MORE
        side.queue.extend([op for op in ops if op.type is not OpType.MORE])
        self._run(side)
        self.flush()
        if len(side.buf) > self.read_limit:
            self.pause_reading_of(side)
        self._resume_drained()

    def eof(self, side: Side) -> None:
        side.eof = True
        side.need_call = True
        self._run(side)
        self.flush()
        if self.closed:
            return
        if not side.reply and not side.buf and self.up is not None and self.up_state == "open":
            if self.up.can_write_eof():
                self.up.write_eof()
        elif side.reply and not side.buf:
            self.close()
        elif not side.reply and self.up is None and not side.buf:
            self.close()

    def _run(self, side: Side) -> None:
        idle = 0
        while not self.closed:
            if side.buf and (side.pass_left or side.drop_left):
                chunk = _take(side, side.pass_left or side.drop_left)
                if side.pass_left:
                    side.pass_left -= len(chunk)
                    self._send(side, chunk)
                else:
                    side.drop_left -= len(chunk)
                if not side.pass_left and not side.drop_left:
                    side.need_call = True
            if side.pass_left or side.drop_left:
                break
            if side.queue:
                self._apply(side, side.queue.popleft())
                if not side.queue and not side.pass_left and not side.drop_left:
                    side.need_call = True
                continue
            if not side.need_call:
                break
            before = len(side.buf)
            buf = side.buf
            ops = self.parser.on_data(side.reply, buf if type(buf) is bytes else bytes(buf),
                                      side.eof)
            side.need_call = bool(ops) and ops[-1].type is not OpType.MORE
            if len(ops) == 1:
                if side.need_call:
                    side.queue.append(ops[0])
            else:
                side.queue.extend([op for op in ops if op.type is not OpType.MORE])
            if not side.queue and len(side.buf) == before and side.need_call:
                idle += 1
                if idle > 2:
                    log.error("parser made no progress on %s: closing", self._name())
                    self.close(abort=True)
                    return
            if not side.buf and not side.queue and side.need_call:
                side.need_call = False
        if not self.closed:
            other = self.request if side.reply else self.reply
            if other.buf and not other.pass_left and not other.drop_left and not other.queue:
                other.need_call = True  # a decision here may unblock the other direction
                if other is not side:
                    self._kick(other)

    def _kick(self, side: Side) -> None:
        if getattr(self, "_kicking", False):
            return
        self._kicking = True
        try:
            self._run(side)
        finally:
            self._kicking = False

    def _apply(self, side: Side, op: Op) -> None:
        kind = op.type
        if kind is OpType.PASS or kind is OpType.DROP:
            chunk = _take(side, op.n) if side.buf else b""
            take = len(chunk)
            if kind is OpType.PASS:
                if chunk:
                    self._send(side, chunk)
                side.pass_left = op.n - take
            else:
                side.drop_left = op.n - take
        elif kind is OpType.INJECT:
            self._write(not side.reply, op.data)
        elif kind is OpType.INSERT:
            self._write(side.reply, op.data)
        elif kind is OpType.CLOSE:
            side.queue.clear()
            self.close()

    def _send(self, side: Side, data: bytes) -> None:
        """Forward bytes of `side` on to the other end."""
        if side.reply:
            self._write(True, data)
        else:
            self._write(False, data)

    def _write(self, to_client: bool, data: bytes) -> None:
        if data and not self.closed:
            (self.out_client if to_client else self.out_up).append(data)

    def flush(self) -> None:
        """Write what this event decided (and fast-path messages of this round still
        waiting, first): one send per side, not one per op."""
        self.in_round = False
        out = self.out_client
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.closed:
                self.down.write(data)
        out = self.out_up
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.closed:
                if self.up_state == "open":  # (`_write_upstream`, inline: once a message)
                    self.up.write(data)
                else:
                    self._write_upstream(data)

    def _write_upstream(self, data: bytes) -> None:
        if self.up_state == "open":
            self.up.write(data)
        elif self.up_state in ("none", "connecting"):
            self.up_pending.append(data)
            if self.up_state == "none":
                self.up_state = "connecting"
                asyncio.get_running_loop().create_task(self._connect())
            if sum(map(len, self.up_pending)) > HIGH_WATER:
                self.pause_reading_of(self.request)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        info = self.info
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, upstream_mark(info))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, (info.dst_ip, info.dst_port)),
                                   CONNECT_TIMEOUT)
            transport, _ = await loop.create_connection(lambda: _Upstream(self), sock=sock)
        except (TimeoutError, OSError) as exc:
            sock.close()
            if isinstance(exc, asyncio.TimeoutError):
                reason = "connection timed out"
            elif exc.errno:
                reason = os.strerror(exc.errno).lower()
            else:
                reason = str(exc)
            self.proxy.stats["upstream_errors"] += 1
            self.up_state = "failed"
            self.up_pending.clear()
            if self.closed:
                return
            for op in self.parser.on_upstream_failure(reason):
                self._apply(self.request, op)
            self.flush()
            return
        if self.closed:
            transport.close()
            return
        self.up = transport
        self.up_state = "open"
        pending, self.up_pending = self.up_pending, []
        for data in pending:
            transport.write(data)
        self.resume_reading_of(self.request)
        if self.request.eof and not self.request.buf and transport.can_write_eof():
            transport.write_eof()

    # flow control and teardown ------------------------------------------------------------
    def pause_reading_of(self, side: Side) -> None:
        transport = self.up if side.reply else self.down
        if transport is not None and not side.paused and not self.closed:
            side.paused = True
            transport.pause_reading()

    def _resume_if_drained(self, side: Side) -> None:
        """Reading paused for a full buffer resumes once it drained — unless the other
        end is still too slow to take more."""
        target = self.down if side.reply else self.up
        if target is not None and target.get_write_buffer_size() > \
                target.get_write_buffer_limits()[1]:
            return
        self.resume_reading_of(side)

    def resume_reading_of(self, side: Side) -> None:
        transport = self.up if side.reply else self.down
        if transport is not None and side.paused and not self.closed:
            side.paused = False
            transport.resume_reading()

    def lost(self, downstream: bool, exc: Exception | None) -> None:
        if self.closed:
            return
        if downstream:
            self.close(abort=exc is not None)
        else:
            if exc is None:  # the upstream closed: flush what it sent, then close
                self.reply.eof = True
                self.reply.need_call = True
                self._run(self.reply)
            self.close(abort=exc is not None)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        if not abort:
            self.flush()  # a local reply decided just before CLOSE still goes out
        self.closed = True
        self.proxy.active.discard(self)
        self.proxy.flow_conn_closed(self.cid)
        for transport in (self.down, self.up):
            if transport is None:
                continue
            if abort:
                transport.abort()
            else:
                transport.close()

    def _name(self) -> str:
        i = self.info
        return f"{i.src_ip}:{i.src_port} -> {i.dst_ip}:{i.dst_port}"


def _flow_base(src: dict[str, Any], dst: dict[str, Any], info: ConnectionInfo,
               reply: bool) -> dict[str, Any]:
    return {"op": "flow", "src_ip": src["ip"], "sport": src["port"],
            "src_identity": src["identity"], "dst_ip": dst["ip"], "dport": dst["port"],
            "dst_identity": dst["identity"], "ep_id": info.ep_id,
            "proxy_port": info.proxy_port,
            "direction": int(Direction[info.direction.upper()]), "is_reply": reply}


def upstream_mark(info: ConnectionInfo) -> int:
    """SO_MARK of the upstream socket: the client's identity, so the destination's policy
    judges the client. From the egress proxy with the magic that makes the destination
    apply its own L7 ingress rules again (its ingress proxy is a separate judge). A
    local-scope (CIDR) identity does not fit a mark: it travels as world (fail closed)."""
    identity = info.src_identity if info.src_identity <= MAX_MARK_IDENTITY else WORLD
    magic = MARK_MAGIC_PROXY_EGRESS if info.direction == "egress" else MARK_MAGIC_IDENTITY
    return mark_encode_identity(identity, magic)


# the process --------------------------------------------------------------------------------

class Proxy:
    """Listeners, the policy table, the control socket and the flow buffer."""

    def __init__(self, state_dir: Path, factory: ParserFactory, listen: dict[str, int],
                 version: str, bind: str = "0.0.0.0", ipcache: str | None = None,
                 reuseport: bool = False):
        self.state_dir = Path(state_dir)
        self.factory = factory
        self.listen = dict(listen)
        self.version = version
        self.bind = bind
        self.reuseport = reuseport
        self.policy = PolicyTable(factory)
        if ipcache:
            from pylium.datapath import libbpf

            try:
                self.policy.ipcache_fd = libbpf.obj_get(ipcache)
            except Exception as exc:
                log.warning("pinned ipcache %s not opened (%s): using the pushed table",
                            ipcache, exc)
        self.active: set[Connection] = set()
        #: whether the fast path's writes wait for the end of the event-loop round
        #: (ROUND_BATCH), the connections whose writes wait, and how many fast-path
        #: messages are written at once before a round is counted again (ROUND_PROBE)
        self.round_writes = False
        self.in_round: list[Connection] = []
        self.until_probe = ROUND_PROBE
        self.servers: list[asyncio.AbstractServer] = []
        #: flow records not yet acknowledged by an agent, oldest first, each encoded once
        #: when made (nothing of a record stays alive as Python objects while it waits):
        #: `batch` = the newest, not flushed yet (its first seq `batch_seq`, the records'
        #: connection sides `batch_c`, `CONTROL_PROTOCOL`'s C); `sent` = the flushed
        #: batches, [first seq, records, their C] each (written to the agent listening then)
        self.batch: list[bytes | tuple[bytes, bytes]] = []  # (a fast path's `FastRecord`)
        self.batch_c: list[int] = []
        #: the numbers of the record prefixes the listening agent has (b"": none)
        self.prefix_ids: dict[bytes, int] = {b"": -1}
        self.batch_seq = 1
        self.sent: collections.deque[list] = collections.deque()
        self.buffered = 0
        self.flush_timer: asyncio.TimerHandle | None = None
        self.seq = 0
        #: connection id -> its part of flow records as announced (`"ID":[req,reply]`),
        #: kept while a record that names it may still have to go to an agent
        self.flow_conns: dict[int, bytes] = {}
        self.next_cid = 0
        #: announcements and ids of closed connections the listening agent has not got yet
        #: (they go with the next batch written to it)
        self.announce: list[bytes] = []
        self.gone: list[int] = []
        #: (seq when it closed, id) of closed connections, oldest first: forgotten once no
        #: record up to that seq can be sent again
        self.closed_conns: collections.deque[tuple[int, int]] = collections.deque()
        #: requests recorded by a parser's fast path (all received and forwarded)
        self.fast_requests = 0
        self.controller: asyncio.StreamWriter | None = None
        self.stats = collections.Counter()
        self.started = time.time()
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for direction, port in self.listen.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuseport:  # one of a pool of workers on these ports
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((self.bind, port))
            sock.listen(1024)
            sock.setblocking(False)
            self.servers.append(await loop.create_server(
                lambda d=direction, p=port: _Downstream(self, d, p), sock=sock))
        path = self.state_dir / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        self.servers.append(await asyncio.start_unix_server(self._control, path=str(path)))
        os.chmod(path, 0o600)
        pidfile = self.state_dir / PIDFILE
        tmp = pidfile.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pidfile)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.active):
            conn.close()
        (self.state_dir / CONTROL_SOCKET).unlink(missing_ok=True)
        pidfile = self.state_dir / PIDFILE
        try:
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        except OSError:
            pass

    # writes -------------------------------------------------------------------------------
    def write_round(self) -> None:
        """The round's waiting messages go out, one send per connection side (the round's
        first such connection scheduled this call, `Connection.received`); whether the next
        rounds wait too depends on how many connections this one had."""
        conns, self.in_round = self.in_round, []
        self.stats["write_rounds"] += 1
        for conn in conns:
            if conn.in_round:  # (else flushed already: a general-path event, a close)
                conn.flush()
        self.round_writes = len(conns) >= ROUND_BATCH
        self.until_probe = ROUND_PROBE

    # flows --------------------------------------------------------------------------------
    def new_flow_conn(self, bases: tuple[bytes, bytes]) -> int:
        """A connection's constant part of flow records (request base, reply base: JSON
        objects): its id, and its announcement queued for the agent."""
        self.next_cid = cid = self.next_cid + 1
        self.flow_conns[cid] = entry = b'"%d":[%b,%b]' % (cid, bases[0], bases[1])
        if self.controller is not None:  # else the next agent's hello announces it
            self.announce.append(entry)
        return cid

    def flow_conn_closed(self, cid: int) -> None:
        """No record names `cid` after `seq`: the agent may drop it after this batch, we
        once every record up to `seq` is acknowledged (or lost)."""
        if self.controller is not None:
            self.gone.append(cid)
        self.closed_conns.append((self.seq, cid))
        # its records may all be acknowledged (or lost) already, or it made none
        self._forget_conns(self._first_unacknowledged() - 1)

    def _first_unacknowledged(self) -> int:
        """The seq of the oldest record an agent may still be sent."""
        return self.sent[0][0] if self.sent else self.batch_seq

    def _forget_conns(self, upto: int) -> None:
        """Records up to `upto` will never be sent again: closed connections whose last
        record is among them are forgotten."""
        closed = self.closed_conns
        while closed and closed[0][0] <= upto:
            self.flow_conns.pop(closed.popleft()[1], None)

    def flow(self, c: int, record: dict[str, Any]) -> None:
        """One parser record as a flow message: `c` names the connection's part (its
        addresses and identities) in the record's direction, `cid*2+is_reply`."""
        self.seq += 1
        verdict = record["verdict"]
        l7 = record["l7"]
        fields = {"verdict": verdict, "l7": l7}
        stats = self.stats
        if "rule" in record:
            fields["rule"] = record["rule"]
        if "error" in record:
            fields["error"] = record["error"]
            stats["parse_errors"] += 1
        if l7.get("type") == "REQUEST":
            stats["requests"] += 1
            stats["denied" if verdict == "DROPPED" else "forwarded"] += 1
        self.add_record(-c, orjson.dumps(fields)[1:-1])

    def add_record(self, c: int, encoded: bytes) -> None:
        """A record (with the next seq; `c` its connection side, negative if not a fast
        path's) joins the batch: flushed FLOW_FLUSH_DELAY after the first of it while an
        agent listens (one write and one wake-up of the agent per batch), or once it holds
        FLOW_BATCH."""
        batch = self.batch
        batch.append(encoded)
        self.batch_c.append(c)
        if len(batch) == 1:
            if self.controller is not None and self.flush_timer is None:
                self.flush_timer = asyncio.get_running_loop().call_later(
                    FLOW_FLUSH_DELAY, self._flush_flows)
        elif len(batch) >= FLOW_BATCH:
            self._flush_flows()

    def _flush_flows(self, write: bool = True) -> None:
        """The batch joins the unacknowledged ones and goes to the agent listening now;
        beyond FLOW_BUFFER records the oldest go (counted lost)."""
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        batch, cs = self.batch, self.batch_c
        if not batch:
            return
        self.batch, self.batch_c = [], []
        self.sent.append([self.batch_seq, batch, cs])
        if write:
            self._write_batch(batch, cs, self.batch_seq)
        self.batch_seq += len(batch)
        self.buffered += len(batch)
        excess = self.buffered - FLOW_BUFFER
        while excess > 0:
            oldest = self.sent[0]
            if len(oldest[1]) <= excess:
                self.sent.popleft()
                lost = len(oldest[1])
            else:
                lost = excess
                oldest[0] += lost
                oldest[1] = oldest[1][lost:]
                oldest[2] = oldest[2][lost:]
            self.buffered -= lost
            excess -= lost
            self.stats["flows_lost"] += lost
            self._forget_conns(self._first_unacknowledged() - 1)

    def _write_batch(self, batch: list[bytes], cs: list[int], seq: int,
                     final: bool = True) -> None:
        """One batch line to the agent (its first record's `seq`, the records' `cs`), after
        the connections its records name; `final`: no record of a closed connection
        follows (its id may go in `gone`)."""
        writer = self.controller
        if writer is not None and not writer.is_closing():
            if writer.transport.get_write_buffer_size() > CONTROL_BACKLOG:
                return  # an agent that stalls gets them later (or they are lost by the bound)
            head = b'{"op":"flows","seq":%d,"c":%b' % (seq, orjson.dumps(cs))
            if self.announce:  # the connections its records name, first
                head += b',"conns":{%b}' % b",".join(self.announce)
                self.announce = []
            if self.gone and final:  # closed: the agent drops them after this batch
                head += b',"gone":[%b]' % b",".join(b"%d" % c for c in self.gone)
                self.gone = []
            kinds = list(map(type, batch))
            if tuple in kinds:  # records in two parts: their prefixes by number
                if kinds.count(tuple) != len(kinds):  # (count: by identity, mostly)
                    batch = [r if type(r) is tuple else (b"", r) for r in batch]
                ids, announce, new = self._prefix_ids(list(map(_PREFIX, batch)))
                head += b',"p":%b%b' % (orjson.dumps(ids), announce)
                batch = [*new, *map(_REST, batch)]  # the new prefixes first
            writer.write(b"%b}%b%b\n" % (head, RECORD_SEP, RECORD_SEP.join(batch)))

    def _prefix_ids(self, prefixes: list[bytes]) -> tuple[list[int], bytes, list[bytes]]:
        """The numbers of these record prefixes for the listening agent; for those it does
        not have yet, the head's `"prefixes"` (after `"prefixes_reset":true` when the
        numbering starts again) and the prefixes themselves, to send before the records."""
        known = self.prefix_ids
        ids = list(map(known.get, prefixes))
        if None not in ids:
            return ids, b"", []
        announce = b""
        if len(known) > PREFIXES_MAX:  # bounded: numbered afresh (the agent forgets too)
            known = self.prefix_ids = {b"": -1}
            ids = list(map(known.get, prefixes))
            announce = b',"prefixes_reset":true'
        new: list[bytes] = []
        i = ids.index(None)
        while True:
            prefix = prefixes[i]
            number = known.get(prefix)
            if number is None:
                number = known[prefix] = len(known) - 1
                new.append(prefix)
            ids[i] = number
            try:
                i = ids.index(None, i + 1)
            except ValueError:
                break
        announce += b',"prefixes":%b' % orjson.dumps(list(map(known.__getitem__, new)))
        return ids, announce, new

    def listen_to(self, writer: Any) -> None:
        """A new agent listens (it said hello on `writer`): it knows no connection a
        record may name, nor any record prefix; every record not acknowledged yet goes to
        it, oldest first."""
        self.controller = writer
        self.announce = list(self.flow_conns.values())
        self.gone = [cid for _seq, cid in self.closed_conns]
        self.prefix_ids = {b"": -1}
        self._flush_flows(write=False)
        chunks = [(first + start, records[start:start + FLOW_BATCH],
                   cs[start:start + FLOW_BATCH])
                  for first, records, cs in self.sent  # unacknowledged, oldest first
                  for start in range(0, len(records), FLOW_BATCH)]
        for i, (seq, chunk, chunk_c) in enumerate(chunks):
            self._write_batch(chunk, chunk_c, seq, final=i == len(chunks) - 1)

    def _acked(self, seq: int) -> None:
        """The agent recorded every flow up to `seq`: they leave the buffer (records sent
        to an agent that died before acknowledging are sent again to the next one)."""
        sent = self.sent
        while sent:
            first, records, cs = sent[0]
            if first + len(records) - 1 <= seq:
                sent.popleft()
                self.buffered -= len(records)
            else:
                if first <= seq:
                    done = seq - first + 1
                    sent[0] = [seq + 1, records[done:], cs[done:]]
                    self.buffered -= done
                break
        self._forget_conns(seq)

    def unacknowledged(self) -> list[tuple[int, int, bytes]]:
        """(seq, connection side, record) of every record no agent acknowledged yet,
        oldest first."""
        out = [(first + i, c, _whole(r)) for first, records, cs in self.sent
               for i, (c, r) in enumerate(zip(cs, records, strict=True))]
        return out + [(self.batch_seq + i, c, _whole(r))
                      for i, (c, r) in enumerate(zip(self.batch_c, self.batch, strict=True))]

    # control ------------------------------------------------------------------------------
    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "control_protocol": CONTROL_PROTOCOL,
                "pid": os.getpid(), "protocol": self.factory.protocol,
                "reuseport": self.reuseport,
                "ports": self.listen, "revision": self.policy.revision,
                "redirects": self.policy.redirects, "active_connections": len(self.active),
                "buffered_flows": self.buffered + len(self.batch), "started": self.started,
                "stats": self._stats()}

    def _stats(self) -> dict[str, int]:
        stats = collections.Counter(self.stats)
        stats["requests"] += self.fast_requests
        stats["forwarded"] += self.fast_requests
        return {k: v for k, v in stats.items() if v}

    async def _control(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                    op = message["op"]
                except (ValueError, KeyError, TypeError):
                    self._send(writer, {"op": "error", "error": "not a control message"})
                    continue
                if op == "hello":
                    if self.controller is not None and self.controller is not writer:
                        self.controller.close()  # the newest agent is the one that listens
                    self._send(writer, {"op": "hello", **self.describe()})
                    self.listen_to(writer)
                elif op == "ack_flows":  # no answer: the agent does not wait for one
                    self._acked(int(message.get("seq", 0)))
                    continue
                elif op == "policy":
                    try:
                        problems = self.policy.load(message)
                    except (KeyError, ValueError, TypeError) as exc:  # keep the old policy
                        self._send(writer, {"op": "error", "error": f"bad policy: {exc!r}"})
                        continue
                    self._send(writer, {"op": "ack", "revision": self.policy.revision,
                                        "redirects": self.policy.redirects,
                                        "problems": problems})
                elif op == "status":
                    self._send(writer, {"op": "status", **self.describe()})
                elif op == "shutdown":
                    self._send(writer, {"op": "bye"})
                    await writer.drain()
                    self.stopping.set()
                else:
                    self._send(writer, {"op": "error", "error": f"unknown op {op!r}"})
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.controller is writer:
                self.controller = None
            writer.close()


# entry points -------------------------------------------------------------------------------

def _listen_arg(value: str) -> tuple[str, int]:
    direction, sep, port = value.partition(":")
    if not sep or direction not in ("ingress", "egress") or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not ingress:PORT or egress:PORT")
    return direction, int(port)


async def _serve(args: argparse.Namespace, ready_fd: int | None) -> int:
    proxy = Proxy(Path(args.state_dir), load_factory(args.parser), dict(args.listen),
                  args.version, args.bind, args.ipcache, args.reuseport)
    try:
        await proxy.start()
    except OSError as exc:
        message = f"l7 proxy: cannot listen: {exc}"
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
            os.close(ready_fd)
        print(message, file=sys.stderr)
        return 1
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    # what startup made (modules, the factory, ~40k objects) stays out of collections: a
    # full one over it is ~10-20 ms, a stall of every connection the proxy carries
    gcpolicy.settle()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.stopping.set)
    log.info("l7 proxy %s (%s) listening on %s", args.version, proxy.factory.protocol,
             proxy.listen)
    await proxy.stopping.wait()
    await proxy.stop()
    return 0


def _detach(args: argparse.Namespace) -> int:
    """Double fork: the proxy is nobody's child (no zombie for the agent that spawned it),
    in its own session; the first process exits once the proxy listens (or says why not)."""
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        answer = b""
        while True:
            piece = os.read(read_fd, 4096)
            if not piece:
                break
            answer += piece
        if answer == b"ok":
            return 0
        print(answer.decode() or "l7 proxy exited before listening", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    logfile = os.open(Path(args.state_dir) / LOGFILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o600)
    os.dup2(logfile, 1)
    os.dup2(logfile, 2)
    _configure_logging()
    try:
        code = _run(_serve(args, write_fd))
    except BaseException:
        log.exception("l7 proxy crashed")
        code = 1
    os._exit(code)


def _run(main: Any) -> int:
    """The proxy's event loop is uvloop's (libuv: the per-event work of reading, writing
    and dispatching is C, not Python), or asyncio's own where uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stop_running(state_dir: Path, timeout: float = 5.0) -> bool:
    """Stop the proxy of `state_dir` and the workers of a pool there (`worker-N`
    subdirectories), SIGTERM by their pidfiles; True if one was running."""
    stopped = _stop_one(state_dir, timeout)
    for worker in sorted(Path(state_dir).glob("worker-*")):
        stopped = _stop_one(worker, timeout) or stopped
    return stopped


def _stop_one(state_dir: Path, timeout: float) -> bool:
    pid = running_pid(state_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def running_pid(state_dir: Path) -> int | None:
    """The pid in `state_dir`'s pidfile if that process is alive and is this proxy."""
    try:
        pid = int((Path(state_dir) / PIDFILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"pylium.l7.proxy" not in cmdline or str(Path(state_dir)).encode() not in cmdline:
        return None
    return pid if _alive(pid) else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stop"]:
        parser = argparse.ArgumentParser(prog="python -m pylium.l7.proxy stop")
        parser.add_argument("--state-dir", required=True)
        args = parser.parse_args(argv[1:])
        stopped = stop_running(Path(args.state_dir))
        print("stopped" if stopped else "no proxy running")
        return 0
    parser = argparse.ArgumentParser(prog="python -m pylium.l7.proxy")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--parser", required=True, help="MODULE:FACTORY")
    parser.add_argument("--listen", action="append", type=_listen_arg, required=True)
    parser.add_argument("--version", default="0")
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--ipcache", default=None, help="pinned ipcache map")
    parser.add_argument("--detach", action="store_true")
    parser.add_argument("--reuseport", action="store_true",
                        help="share the ports with other workers (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    try:
        load_factory(args.parser)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"l7 proxy: parser {args.parser!r}: {exc}", file=sys.stderr)
        return 2
    if args.detach:
        return _detach(args)
    _configure_logging()
    return _run(_serve(args, None))


if __name__ == "__main__":
    sys.exit(main())
