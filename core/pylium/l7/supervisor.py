"""The agent's side of the L7 proxy process (`pylium.l7.proxy`): spawn it detached or adopt
the one a previous agent left running, push it the L7 policy, take its flow records, and
know at every moment whether it serves its ports (a dead proxy serves none: fail closed).

Protocol-neutral: an L7 parser plugin gives the parser spec it runs (`module:Factory`) and
its ports; Kafka or any other protocol reuses this as is."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import operator
import os
import sys
import termios
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

from pylium.errors import PluginError
from pylium.l7 import proxy as proxy_process

log = logging.getLogger(__name__)

SPAWN_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0
ACK_DELAY = 0.05
#: control protocols of proxies this agent talks to: 5 (4, and records in two parts, a
#: recurring prefix sent once), 4 (records as the parser made them, `FlowBatch`), 3 (JSON
#: records naming connections announced once) and 2 (every record whole), so a proxy an
#: older agent left running is adopted, not cut
CONTROL_PROTOCOLS = (2, 3, 4, proxy_process.CONTROL_PROTOCOL)
RECORD_SEP = proxy_process.RECORD_SEP
#: the longest control line taken (a batch line is ~200 KB)
LINE_LIMIT = 1 << 24
#: FIONREAD's answer for a socket with nothing unread
NO_BYTES = bytes(4)


def policy_message(snapshot: Iterable[Mapping[str, Any]], protocol: str,
                   ipcache: Iterable[tuple[str, int]] = (), revision: int = 0) -> dict[str, Any]:
    """`L7PolicySource.snapshot()` as the JSON the proxy loads: per local endpoint, every
    redirected key that carries a `protocol` grant, with all grants of that key (an
    allow-all grant of another rule still allows every request, as in Cilium)."""
    endpoints = []
    for ep in snapshot:
        entries = []
        for key, grants in ep["entries"]:
            if not any(g.kind == protocol for g in grants):
                continue
            entries.append({
                "identity": int(key.identity), "direction": key.direction.name.lower(),
                "protocol": int(key.protocol), "port": int(key.port),
                "port_prefix_len": int(key.port_prefix_len),
                "grants": [{"rule": g.rule, "kind": g.kind, "allow_all": bool(g.allow_all),
                            "rules": [attrs.asdict(r) if attrs.has(type(r)) else r
                                      for r in (g.rules or ())]} for g in grants]})
        endpoints.append({"ep_id": int(ep["ep_id"]), "ipv4": ep["ipv4"],
                          "identity": int(ep["identity"]), "entries": entries})
    return {"op": "policy", "revision": revision, "endpoints": endpoints,
            "ipcache": [[cidr, int(identity)] for cidr, identity in ipcache]}


def expand_flows(conns: dict[int, tuple[dict[str, Any], dict[str, Any]]],
                 message: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A batch line's records as the whole flow records protocol 2 sent, and how many
    named a connection never announced (dropped): `conns` (id -> request and reply base)
    first learns the line's announced connections, each `"c": ID*2+is_reply` becomes that
    connection's base plus the record's fields, then the connections the proxy says are
    gone leave `conns`. A protocol 2 record (no `c`) is whole already."""
    for cid, bases in (message.get("conns") or {}).items():
        conns[int(cid)] = (bases[0], bases[1])
    out = []
    unknown = 0
    for record in message.get("flows") or ():
        c = record.pop("c", None)
        if c is None:
            out.append(record)
            continue
        bases = conns.get(c >> 1)
        if bases is None:
            unknown += 1
            continue
        flow = bases[c & 1].copy()
        flow.update(record)
        out.append(flow)
    for cid in message.get("gone") or ():
        conns.pop(cid, None)
    return out, unknown


class ConnSide:
    """One direction of a proxied connection as a protocol 4 proxy announced it: its part
    of every record (`base`: `record_l7`'s fields but `l7`), and what the agent derives
    from it once rather than per record (`head`, the flow layer's `l7_head`; `memo`, a
    protocol plugin's own)."""

    __slots__ = ("base", "reply", "direction", "head", "memo")

    def __init__(self, base: dict[str, Any]):
        self.base = base
        self.reply = bool(base.get("is_reply"))
        self.direction = base.get("direction")
        #: None: its part is not a flow's (its records are not recorded)
        self.head: tuple | None = ()
        self.memo: Any = None


class FlowBatch:
    """One protocol 4 or 5 batch line: `records` (seq `seq`, `seq + 1`, ...) as the proxy
    sent them (the members of each one's JSON object; under 5, after its `prefixes`
    entry), the connection side of each (`cs`: ID*2+is_reply for a parser's fast path's,
    FORWARDED without error; its negative for any other) and the sides announced so far
    (`sides[C]`). A consumer takes a fast record as it is and `whole()` the others."""

    __slots__ = ("seq", "cs", "records", "sides", "fresh", "owner", "prefixes")

    def __init__(self, seq: int, cs: list[int], records: list[bytes],
                 sides: dict[int, ConnSide], owner: ProxySupervisor,
                 fresh: list[ConnSide] | None = None, prefixes: list[bytes] | None = None):
        self.seq, self.cs, self.records, self.sides = seq, cs, records, sides
        #: the sides this line announced (`sides` has them already)
        self.fresh = fresh or []
        self.owner = owner
        #: protocol 5: each record's prefix (b"": none; a record is its prefix + its entry
        #: in `records`); None: every record is whole
        self.prefixes = prefixes

    def wholes(self, lo: int = 0, hi: int | None = None) -> list[bytes]:
        """Records lo..hi whole (their prefixes joined on)."""
        records = self.records[lo:hi]
        if self.prefixes is None:
            return records
        return list(map(operator.add, self.prefixes[lo:hi], records))

    def whole(self, c: int, fields: bytes, seq: int) -> dict[str, Any] | None:
        """The record as protocol 2 sent it (its connection's part, its fields, `seq`);
        None if it names no announced connection or does not decode (counted)."""
        side = self.sides.get(abs(c))
        if side is None:
            self.owner.unknown_conns += 1
            return None
        try:
            decoded = orjson.loads(b"{%b}" % fields)
        except ValueError:
            self.owner.malformed_records += 1
            return None
        flow = side.base.copy()
        flow.update(decoded)
        flow["seq"] = seq
        return flow

    def expand(self) -> list[dict[str, Any]]:
        """Every record `whole()` (what an `on_flows` consumer gets)."""
        out = []
        for i, (c, record) in enumerate(zip(self.cs, self.wholes(), strict=True)):
            flow = self.whole(c, record, self.seq + i)
            if flow is not None:
                out.append(flow)
        return out


class LineReader(asyncio.StreamReader):
    """The agent's reading end of a proxy's control socket: each line goes to `on_line`
    as soon as the socket gave all of it (a ~200 KB batch line is not copied into a
    buffer, out of it and into bytes again, and no reading task wakes for each chunk).
    `readline()` then only returns b"" at the end, or raises what a line raised (a line
    longer than `limit` raises ValueError, as StreamReader's does); after that, or
    `stop()`, no more lines are taken. A last line without its newline is taken at the
    end, as `readline()` returned it."""

    def __init__(self, on_line: Callable[[bytes], None], limit: int,
                 loop: asyncio.AbstractEventLoop):
        super().__init__(limit=limit, loop=loop)
        self.on_line: Callable[[bytes], None] | None = on_line
        self.limit = limit
        #: the chunks of the line not yet whole, and their length
        self.pending: list[bytes] = []
        self.pending_size = 0
        #: while a line is taken: how many bytes the socket gave after it (more lines)
        self.after = 0

    def stop(self) -> None:
        """Take no more lines (the supervisor is letting the connection go)."""
        self.on_line = None

    def feed_data(self, data: bytes) -> None:
        on_line = self.on_line
        if on_line is None or self.exception() is not None or not data:
            return
        start, end = 0, data.find(b"\n")
        try:
            while end >= 0:
                if self.pending_size + end - start > self.limit:  # (as readline)
                    raise ValueError("Separator is found, but chunk is longer than limit")
                if self.pending:
                    self.pending.append(data[start:end + 1])
                    line = b"".join(self.pending)
                    self.pending, self.pending_size = [], 0
                else:
                    line = data[start:end + 1]  # all of data: not copied
                self.after = len(data) - end - 1
                on_line(line)
                start, end = end + 1, data.find(b"\n", end + 1)
            self.after = 0
            if start < len(data):
                self.pending.append(data[start:])
                self.pending_size += len(data) - start
                if self.pending_size > self.limit:
                    raise ValueError("Separator is not found, and chunk exceed the limit")
        except Exception as exc:  # (BaseException: goes to the loop, as it would)
            self.pending, self.pending_size = [], 0
            self.set_exception(exc)

    def feed_eof(self) -> None:
        on_line = self.on_line
        if self.pending and on_line is not None and self.exception() is None:
            line = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            try:
                on_line(line)
            except Exception as exc:
                self.set_exception(exc)
        super().feed_eof()


class ProxySupervisor:
    """One proxy process per L7 capability, identified by its state directory."""

    def __init__(self, state_dir: Path, parser_spec: str, listen: Mapping[str, int],
                 version: str, *, on_flow: Callable[[dict[str, Any]], None],
                 on_flows: Callable[[list[dict[str, Any]]], None] | None = None,
                 on_batch: Callable[[FlowBatch], None] | None = None,
                 ipcache_pin: str | None = None, launcher: Iterable[str] = (),
                 logger: logging.Logger | None = None, reuseport: bool = False):
        self.state_dir = Path(state_dir)
        #: one worker of a `ProxyPool` (its listeners share the ports)
        self.reuseport = reuseport
        self.parser_spec = parser_spec
        self.listen = dict(listen)
        self.version = version
        self.on_flow = on_flow
        #: if given, takes each batch line's records at once instead (`on_flow` each)
        self.on_flows = on_flows
        #: if given, takes a protocol 4 batch as it came (`FlowBatch`) instead of either
        self.on_batch = on_batch
        self.ipcache_pin = ipcache_pin
        #: a command prefix for the spawn (e.g. `nsenter --net=...` in tests)
        self.launcher = list(launcher)
        self.log = logger or log
        self.reader: LineReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.info: dict[str, Any] = {}
        self.how = ""
        self.last_policy: dict[str, Any] | None = None
        self.last_ack: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._read_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.restarts = 0
        self.error = ""
        self._wake = asyncio.Event()
        self.acked_upto = 0
        self._ack_pending = False
        #: connection id -> (request base, reply base) as a protocol 3 proxy announced them;
        #: a new control connection starts empty (the proxy announces again)
        self.conns: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        #: the sides of the connections a protocol 4 proxy announced, by `ID*2+is_reply`
        self.sides: dict[int, ConnSide] = {}
        #: record prefixes a protocol 5 proxy sent, by number (-1: none); per connection
        self.prefixes: dict[int, bytes] = {-1: b""}
        #: records naming a connection never announced (none, unless the proxy is wrong)
        self.unknown_conns = 0
        #: protocol 4 records whose fields did not decode (none, unless the proxy is wrong)
        self.malformed_records = 0

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> str:
        """Adopt a running proxy of the same version and ports, else spawn one. Returns
        "adopted", "spawned" or "replaced"."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.how = await self._connect_or_spawn()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        return self.how

    async def _connect_or_spawn(self) -> str:
        how = "spawned"
        if proxy_process.running_pid(self.state_dir) is not None:
            try:
                hello = await self._connect()
            except (TimeoutError, OSError, ValueError) as exc:
                self.log.warning("l7 proxy pid %s does not answer (%s): replacing it",
                                 proxy_process.running_pid(self.state_dir), exc)
                hello = None
            if hello is not None and self._compatible(hello):
                return "adopted"
            if hello is not None:
                self.log.warning("l7 proxy pid %s runs %s on %s; want %s on %s: replacing it",
                                 hello.get("pid"), hello.get("version"), hello.get("ports"),
                                 self.version, self.listen)
            await self._disconnect()
            await asyncio.to_thread(proxy_process.stop_running, self.state_dir)
            how = "replaced"
        await self._spawn()
        hello = await self._connect()
        if not self._compatible(hello):
            raise PluginError(f"the l7 proxy just spawned answers {hello}")
        return how

    def _compatible(self, hello: dict[str, Any]) -> bool:
        return (hello.get("version") == self.version
                and hello.get("control_protocol") in CONTROL_PROTOCOLS
                and bool(hello.get("reuseport")) == self.reuseport
                and {k: int(v) for k, v in (hello.get("ports") or {}).items()} == self.listen)

    async def _spawn(self) -> None:
        cmd = [*self.launcher, sys.executable, "-m", "pylium.l7.proxy",
               "--state-dir", str(self.state_dir), "--parser", self.parser_spec,
               "--version", self.version, "--detach"]
        for direction, port in sorted(self.listen.items()):
            cmd += ["--listen", f"{direction}:{port}"]
        if self.ipcache_pin:
            cmd += ["--ipcache", self.ipcache_pin]
        if self.reuseport:
            cmd.append("--reuseport")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), SPAWN_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise PluginError("the l7 proxy did not start listening within "
                              f"{SPAWN_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            reason = (err or out).decode(errors="replace").strip().splitlines()
            raise PluginError(f"the l7 proxy did not start: "
                              f"{reason[-1] if reason else f'exit {proc.returncode}'}")
        self.log.info("l7 proxy spawned (pid %s)", proxy_process.running_pid(self.state_dir))

    async def _connect(self) -> dict[str, Any]:
        path = str(self.state_dir / proxy_process.CONTROL_SOCKET)
        loop = asyncio.get_running_loop()
        reader = LineReader(self._take_line, limit=LINE_LIMIT, loop=loop)
        transport, protocol = await asyncio.wait_for(loop.create_unix_connection(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), path), REQUEST_TIMEOUT)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.reader, self.writer = reader, writer
        self.replies = asyncio.Queue()
        self.acked_upto = 0  # sequence numbers are the proxy process's own
        self.conns = {}
        self.sides = {}
        self.prefixes = {-1: b""}
        self._read_task = asyncio.get_running_loop().create_task(self._read(reader))
        hello = await self._request({"op": "hello", "version": self.version})
        self.info = hello
        self.error = ""
        return hello

    async def _disconnect(self) -> None:
        if self.reader is not None:  # lines that still come are not taken (nor acked)
            self.reader.stop()
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
            self._read_task = None
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None
        self.info = {}  # nothing is known of a proxy we do not talk to

    async def close(self) -> None:
        """Stop talking to the proxy; the process keeps serving for the next agent."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
        await self._disconnect()

    async def shutdown(self) -> None:
        """Stop the proxy process itself (its connections end)."""
        await self.close()
        await asyncio.to_thread(proxy_process.stop_running, self.state_dir)

    # talking ------------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Take the proxy's lines until the socket ends (a `LineReader` takes them as
        they arrive: then this only waits for the end, or for what a line raised)."""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._take_line(line)
        except (ConnectionError, ValueError, KeyError, TypeError,  # orjson: ValueError
                asyncio.IncompleteReadError) as exc:
            self.error = f"control socket: {exc}"
        finally:
            self.replies.put_nowait({"op": "closed"})
            self._wake.set()  # the proxy may be gone: the watchdog looks now

    def backlogged(self) -> bool:
        """Whether more of the proxy's lines wait to be taken: bytes the socket gave after
        the line being taken, or bytes it holds unread (the agent is behind: the proxy's
        buffer of unacknowledged records fills, and past its bound records are lost)."""
        reader = self.reader
        if reader is None:
            return False
        if reader.after or reader.pending_size:
            return True
        sock = self.writer.get_extra_info("socket") if self.writer is not None else None
        if sock is None:
            return False
        try:
            unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, NO_BYTES)
        except (OSError, ValueError):  # (closed)
            return False
        return unread != NO_BYTES

    def _take_line(self, line: bytes) -> None:
        message = self.take(line)
        if message is not None:
            self.replies.put_nowait(message)

    def take(self, line: bytes) -> dict[str, Any] | None:
        """One line from the proxy: flow records are taken (and acknowledged); anything
        else is returned (an answer). Raises ValueError (KeyError, TypeError) for a line
        that is not the protocol."""
        if RECORD_SEP in line:  # protocol 4: a batch's head, then its records as they are
            records = line.split(RECORD_SEP)
            if records[-1].endswith(b"\n"):
                records[-1] = records[-1][:-1]
            self._batch(orjson.loads(records[0]), records[1:])
            return None
        message = orjson.loads(line)
        if message.get("op") != "flows":
            return message
        flows = self.expand(message)  # protocols 2 and 3
        self._deliver(flows)
        if flows:
            self._ack(int(flows[-1].get("seq", 0)))
        return None

    def _batch(self, message: dict[str, Any], records: list[bytes]) -> None:
        """A protocol 4 batch line: its connections learnt, its records to `on_batch`
        (or whole to `on_flows` / `on_flow`), the connections gone forgotten, then
        acknowledged."""
        sides = self.sides
        fresh = []
        for cid, bases in (message.get("conns") or {}).items():
            cid = int(cid)
            fresh += (ConnSide(bases[0]), ConnSide(bases[1]))
            sides[cid * 2], sides[cid * 2 + 1] = fresh[-2:]
        prefixes = None
        if "p" in message:  # protocol 5: records in two parts
            records, prefixes = self._prefixed(message, records)
        cs = message["c"]
        if type(cs) is not list or len(cs) != len(records):
            raise ValueError(f"a batch of {len(records)} records names {cs!r}")
        batch = FlowBatch(int(message["seq"]), cs, records, sides, self, fresh, prefixes)
        if self.on_batch is not None:
            self._record(self.on_batch, batch)
        else:
            self._deliver(batch.expand())
        for cid in message.get("gone") or ():
            sides.pop(cid * 2, None)
            sides.pop(cid * 2 + 1, None)
        self._ack(batch.seq + len(batch.records) - 1)

    def _prefixed(self, message: dict[str, Any],
                  members: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """A protocol 5 batch's records (their rests) and each one's prefix, after the new
        prefixes the line carries first are learnt. A number never sent names no prefix:
        counted (`malformed_records`), its record taken as its rest alone."""
        if message.get("prefixes_reset"):
            self.prefixes = {-1: b""}
        known = self.prefixes
        new = message.get("prefixes") or []
        numbers = message["p"]
        if type(new) is not list or type(numbers) is not list or len(new) > len(members):
            raise ValueError(f"a batch of {len(members)} members announces {new!r}")
        if new:
            known.update(zip(new, members[:len(new)], strict=True))
            members = members[len(new):]
        if len(numbers) != len(members):
            raise ValueError(f"a batch of {len(members)} records names prefixes {numbers!r}")
        prefixes = list(map(known.get, numbers))
        if None in prefixes:
            self.malformed_records += prefixes.count(None)
            prefixes = [b"" if p is None else p for p in prefixes]
        return members, prefixes

    def _record(self, take: Any, flows: Any) -> None:
        """Hand a batch of flows to the agent's callback: flows we cannot record must not
        stop the reader."""
        try:
            take(flows)
        except Exception:
            self.log.exception("recording L7 flows failed")

    def _deliver(self, flows: list[dict[str, Any]]) -> None:
        """Whole records to `on_flows`, else to `on_flow` each."""
        if self.on_flows is not None:
            self._record(self.on_flows, flows)
        else:
            on_flow = self.on_flow
            for flow in flows:
                try:
                    on_flow(flow)
                except Exception:  # nor one we cannot record
                    self.log.exception("recording an L7 flow failed")

    def expand(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """A batch line's records as whole flow records (`expand_flows`)."""
        flows, unknown = expand_flows(self.conns, message)
        self.unknown_conns += unknown
        return flows

    def _ack(self, seq: int) -> None:
        """Acknowledge recorded flows, at most every ACK_DELAY (the proxy keeps what is
        not acknowledged and sends it again to the next agent)."""
        self.acked_upto = max(self.acked_upto, seq)
        if not self._ack_pending and self.writer is not None:
            self._ack_pending = True
            asyncio.get_running_loop().call_later(ACK_DELAY, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_pending = False
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(b'{"op":"ack_flows","seq":%d}\n' % self.acked_upto)

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self.writer is None:
                raise ConnectionError("not connected to the l7 proxy")
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            await self.writer.drain()
            reply = await asyncio.wait_for(self.replies.get(), REQUEST_TIMEOUT)
        if reply.get("op") == "closed":
            raise ConnectionError("the l7 proxy closed the control socket")
        if reply.get("op") == "error":
            raise ValueError(reply.get("error"))
        return reply

    async def push(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send a policy; it is re-sent whenever the proxy is adopted or respawned."""
        self.last_policy = message
        try:
            self.last_ack = await self._request(message)
        except (TimeoutError, ConnectionError, OSError, ValueError) as exc:
            self.log.warning("l7 policy push failed (%s); the watchdog retries", exc)
            self.error = str(exc)
            return None
        for problem in self.last_ack.get("problems", []):
            self.log.error("l7 rule not enforced (denies every request): %s", problem)
        return self.last_ack

    async def refresh(self) -> dict[str, Any]:
        self.info = await self._request({"op": "status"})
        return self.info

    # health -------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Talking to the proxy whose pid its pidfile names, and it answered hello."""
        return (bool(self.info) and self.writer is not None and not self.writer.is_closing()
                and self._read_task is not None and not self._read_task.done()
                and proxy_process.running_pid(self.state_dir) == self.info.get("pid"))

    def served_ports(self) -> set[int]:
        if not self.healthy():
            return set()
        return {int(p) for p in (self.info.get("ports") or {}).values()}

    async def _watch(self) -> None:
        """Reconnect to (or respawn) a proxy that went away, then re-push the policy. While
        it is away `served_ports()` is empty: the agent's L7 component sees that within a
        second and reloads the endpoints' policy maps (redirects load as deny)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_INTERVAL)
            self._wake.clear()
            if self.healthy():
                with contextlib.suppress(Exception):
                    await self.refresh()
                continue
            self.log.warning("l7 proxy is gone (%s): restarting it", self.error or "no answer")
            await self._disconnect()
            try:
                self.how = await self._connect_or_spawn()
                self.restarts += 1
                if self.last_policy is not None:
                    await self.push(self.last_policy)
            except Exception as exc:
                self.error = str(exc)
                self.log.error("l7 proxy restart failed: %s", exc)

    def status(self) -> dict[str, Any]:
        info = self.info or {}
        return {"pid": info.get("pid"), "healthy": self.healthy(), "how": self.how,
                "version": info.get("version"), "ports": info.get("ports", {}),
                "policy_revision": info.get("revision"), "redirects": info.get("redirects"),
                "active_connections": info.get("active_connections"),
                "buffered_flows": info.get("buffered_flows"), "stats": info.get("stats", {}),
                "restarts": self.restarts, "error": self.error,
                "state_dir": str(self.state_dir)}


WORKER_DIR = "worker-{}"


class ProxyPool:
    """`workers` proxy processes on the same ports, as one `ProxySupervisor` to the agent.

    One worker is the plain proxy in `state_dir` (as before pools existed). Several are
    `state_dir/worker-N`, each with SO_REUSEPORT listeners (the kernel spreads new
    connections over them; TPROXY and bpf_sk_assign pick among a reuseport group), each
    adopted or respawned by its own supervisor and pushed the same policy. Fail closed:
    the ports count as served only while every worker is healthy, and a policy counts as
    delivered only when every worker acknowledged it. Workers left by a pool of another
    size (or the single proxy) are stopped first: an old one would keep a share of the
    connections under a policy nobody updates."""

    def __init__(self, state_dir: Path, parser_spec: str, listen: Mapping[str, int],
                 version: str, *, workers: int = 1,
                 on_flow: Callable[[dict[str, Any]], None],
                 on_flows: Callable[[list[dict[str, Any]]], None] | None = None,
                 on_batch: Callable[[FlowBatch], None] | None = None,
                 ipcache_pin: str | None = None, launcher: Iterable[str] = (),
                 logger: logging.Logger | None = None):
        if workers < 1:
            raise PluginError(f"proxy workers must be at least 1, not {workers}")
        self.state_dir = Path(state_dir)
        self.workers = workers
        self.log = logger or log
        dirs = [self.state_dir] if workers == 1 else \
            [self.state_dir / WORKER_DIR.format(i) for i in range(workers)]
        self.members = [ProxySupervisor(d, parser_spec, listen, version, on_flow=on_flow,
                                        on_flows=on_flows, on_batch=on_batch,
                                        ipcache_pin=ipcache_pin, launcher=launcher,
                                        logger=logger, reuseport=workers > 1)
                        for d in dirs]

    def _strays(self) -> list[Path]:
        """State directories of proxies this pool does not own."""
        found = [self.state_dir] if self.workers > 1 else []
        for path in sorted(self.state_dir.glob(WORKER_DIR.format("*"))):
            index = path.name.removeprefix(WORKER_DIR.format(""))
            if self.workers == 1 or not index.isdigit() or int(index) >= self.workers:
                found.append(path)
        return found

    async def start(self) -> str:
        """Stop strays, then adopt or spawn every worker: "adopted" when all were
        adopted, else how the first that was not came up."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stray in self._strays():
            if proxy_process.running_pid(stray) is not None:
                self.log.warning("stopping the l7 proxy of %s (not part of a pool of %d)",
                                 stray, self.workers)
                await asyncio.to_thread(proxy_process.stop_running, stray)
        hows = await asyncio.gather(*(m.start() for m in self.members))
        return next((h for h in hows if h != "adopted"), "adopted")

    @property
    def how(self) -> str:
        return next((m.how for m in self.members if m.how != "adopted"), "adopted")

    @property
    def info(self) -> dict[str, Any]:
        """The first worker's hello/status, with every worker's pid."""
        return {**self.members[0].info, "pids": [m.info.get("pid") for m in self.members]}

    @property
    def last_ack(self) -> dict[str, Any]:
        return self.members[0].last_ack

    @property
    def restarts(self) -> int:
        return sum(m.restarts for m in self.members)

    async def push(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The policy to every worker; the first worker's ack, or None unless all acked."""
        acks = await asyncio.gather(*(m.push(message) for m in self.members))
        return acks[0] if all(a is not None for a in acks) else None

    async def refresh(self) -> dict[str, Any]:
        await asyncio.gather(*(m.refresh() for m in self.members))
        return self.info

    def healthy(self) -> bool:
        return all(m.healthy() for m in self.members)

    def served_ports(self) -> set[int]:
        ports = [m.served_ports() for m in self.members]
        return set.intersection(*ports)

    def status(self) -> dict[str, Any]:
        out = self.members[0].status()
        if self.workers > 1:
            states = [m.status() for m in self.members]
            out.update(healthy=self.healthy(), pid=[s["pid"] for s in states],
                       restarts=self.restarts, state_dir=str(self.state_dir),
                       error="; ".join(s["error"] for s in states if s["error"]),
                       active_connections=sum(s["active_connections"] or 0 for s in states),
                       buffered_flows=sum(s["buffered_flows"] or 0 for s in states),
                       stats=dict(sum((collections.Counter(s["stats"]) for s in states),
                                      collections.Counter())),
                       workers=states)
        return out

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self.members))

    async def shutdown(self) -> None:
        await asyncio.gather(*(m.shutdown() for m in self.members))
