"""Datapath events (`struct pylium_event`, bpf/lib/events.h, 64 bytes) → `Flow` records.

Batch-oriented: one `struct.iter_unpack` over a whole ring-buffer batch, table lookups for
everything derived from small codes (verdict, port byte order), and caches for the expensive
parts (address text, peer enrichment) — those repeat across a pod's flows."""

from __future__ import annotations

import itertools
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from pylium.flow.model import (
    DROP_POLICY_DENIED,
    EVENT_DROP,
    EVENT_POLICY_VERDICT,
    EVENT_TRACE,
    NO_PEER,
    PV_ALLOW,
    PV_AUDIT,
    PV_DENY,
    PV_REDIRECT,
    TRACE_LB_XLATE,
    Flow,
    Peer,
    ServiceRef,
)

#: struct pylium_event, little-endian host layout; saddr/daddr kept as raw network-order bytes,
#: sport/dport read little-endian and byte-swapped through a table (they are be16)
EVENT_FORMAT = "<QBBBBHHII4s4sHHBB2xIIH14x"
EVENT = struct.Struct(EVENT_FORMAT)
EVENT_SIZE = 64
assert EVENT.size == EVENT_SIZE
#: the same record framed as it lies in the kernel ring buffer: 8-byte record header first
#: (length and flags, checked by the mapped reader before it hands a batch over)
FRAMED_EVENT = struct.Struct("<8x" + EVENT_FORMAT[1:])
FRAMED_EVENT_SIZE = FRAMED_EVENT.size

#: full layout including pads, for encoders (tests, the bench) and the ctypes mirror
FIELDS = (
    ("ts_ns", 0, "Q"), ("type", 8, "B"), ("reason", 9, "B"), ("direction", 10, "B"),
    ("flags", 11, "B"), ("ep_id", 12, "H"), ("proxy_port", 14, "H"),
    ("src_identity", 16, "I"), ("dst_identity", 20, "I"), ("saddr", 24, "4s"),
    ("daddr", 28, "4s"), ("sport", 32, "H"), ("dport", 34, "H"), ("protocol", 36, "B"),
    ("tcp_flags", 37, "B"), ("ifindex", 40, "I"), ("pkt_len", 44, "I"), ("rev_nat", 48, "H"),
)

FLAG_REPLY = 0x1
FLAG_ENCRYPTED = 0x4  # bpf/lib/events.h EVENT_F_ENCRYPTED
FLAG_CT_NEW = 0x2

#: the decode loop builds `Flow` tuples with exactly this many fields
_FLOW_FIELDS = 25
assert len(Flow._fields) == _FLOW_FIELDS, "Decoder.decode builds Flow field by field"

SWAP16 = tuple(((p & 0xFF) << 8) | (p >> 8) for p in range(65536))


def _verdict_table() -> dict[tuple[int, int], tuple[str, int]]:
    """(type, reason) → (Hubble verdict, Cilium drop code or 0)."""
    table: dict[tuple[int, int], tuple[str, int]] = {}
    for reason in range(256):
        table[(EVENT_DROP, reason)] = ("DROPPED", reason)
        table[(EVENT_TRACE, reason)] = ("FORWARDED", 0)
        table[(EVENT_POLICY_VERDICT, reason)] = ("VERDICT_UNKNOWN", 0)
    table[(EVENT_TRACE, TRACE_LB_XLATE)] = ("TRANSLATED", 0)
    table[(EVENT_POLICY_VERDICT, PV_ALLOW)] = ("FORWARDED", 0)
    table[(EVENT_POLICY_VERDICT, PV_DENY)] = ("DROPPED", DROP_POLICY_DENIED)
    table[(EVENT_POLICY_VERDICT, PV_REDIRECT)] = ("REDIRECTED", 0)
    table[(EVENT_POLICY_VERDICT, PV_AUDIT)] = ("AUDIT", 0)
    return table


VERDICT = _verdict_table()
#: the same, indexed by type << 8 | reason (one list index per event, no key tuple)
VERDICT_BY_CODE = [VERDICT.get((code >> 8, code & 0xFF), ("VERDICT_UNKNOWN", 0))
                   for code in range(1 << 16)]

#: resolve(ip, identity, ep_id) → Peer | None. `ep_id` is the local endpoint's id when this
#: side is the event's endpoint, else 0. Supplied by the agent (endpoints + identities).
Resolver = Callable[[str, int, int], "Peer | None"]
#: service_of(rev_nat_index) → ServiceRef | None: the service a translated flow went
#: through. Supplied by the agent (the lb component).
ServiceResolver = Callable[[int], "ServiceRef | None"]


_GENERATIONS = itertools.count(1)


def monotonic_to_wall_offset() -> int:
    """Add to a CLOCK_MONOTONIC timestamp (bpf_ktime_get_ns) to get UNIX epoch ns."""
    return time.time_ns() - time.monotonic_ns()


class Decoder:
    """Turns event batches into flows; keeps per-(type, verdict, reason, direction) counts
    for metrics (read at scrape time, so counting costs one dict update per event)."""

    def __init__(self, node_name: str, resolver: Resolver | None = None,
                 cache_ttl: float = 2.0, cache_max: int = 65536,
                 services: ServiceResolver | None = None):
        self.node_name = node_name
        self.resolver = resolver
        self.services = services
        #: per batch only: service ids are reused after a delete, so a longer-lived cache
        #: could name a new service's flows after the old one
        self._services: dict[int, ServiceRef | None] = {}
        self.cache_ttl = cache_ttl
        self.cache_max = cache_max
        self._ip_text: dict[bytes, str] = {}
        self._peers: dict[tuple[str, int, int], Peer] = {}
        self._peers_at = time.monotonic()
        #: type << 16 | reason << 8 | direction → events (the decode loop counts by one
        #: int; `counts` folds them into the metric's labels when read)
        self._code_counts: dict[int, int] = {}
        #: (kind, verdict, drop_reason, direction) → events counted another way (L7 flows)
        self._other_counts: dict[tuple[int, str, int, int], int] = {}
        self.decoded = 0
        self.resolver_errors = 0
        #: changes whenever cached enrichment is forgotten (`invalidate`): who keeps peers
        #: of their own (an L7 connection's flow head) takes them again then; unique
        #: across decoders, so a head made by another decoder is never taken for current
        self.generation = next(_GENERATIONS)

    @property
    def counts(self) -> dict[tuple[int, str, int, int], int]:
        """(kind, verdict, drop_reason, direction) → events decoded or counted."""
        out = dict(self._other_counts)
        for code, n in list(self._code_counts.items()):
            verdict, drop = VERDICT_BY_CODE[code >> 8]
            key = (code >> 16, verdict, drop, code & 0xFF)
            out[key] = out.get(key, 0) + n
        return out

    def count(self, key: tuple[int, str, int, int], n: int = 1) -> None:
        """Count `n` flows that did not come through `decode` (L7 flows)."""
        self._other_counts[key] = self._other_counts.get(key, 0) + n

    def peer(self, ip: str, identity: int, ep_id: int) -> Peer:
        """The enriched side of a flow (cached; see `Resolver`)."""
        key = (ip, identity, ep_id)
        peer = self._peers.get(key)
        if peer is not None:
            return peer
        peer = NO_PEER
        if self.resolver is not None:
            try:
                peer = self.resolver(ip, identity, ep_id) or NO_PEER
            except Exception:
                self.resolver_errors += 1
                peer = NO_PEER
        if peer is NO_PEER and identity:
            peer = Peer(identity=identity)
        if len(self._peers) >= self.cache_max:
            self._peers.clear()
        self._peers[key] = peer
        return peer

    def service(self, rev_nat: int) -> ServiceRef | None:
        """The service behind a rev-NAT index (None: unknown), asked once per batch."""
        if rev_nat in self._services:
            return self._services[rev_nat]
        ref = None
        if self.services is not None:
            try:
                ref = self.services(rev_nat)
            except Exception:
                self.resolver_errors += 1
        self._services[rev_nat] = ref
        return ref

    def invalidate(self) -> None:
        """Forget cached enrichment (labels or pods changed)."""
        self._peers.clear()
        self._peers_at = time.monotonic()
        self.generation = next(_GENERATIONS)

    def decode(self, buf: Any, wall_offset_ns: int | None = None,
               framed: bool = False) -> list[Flow]:
        """Decode a buffer of whole 64-byte events (bytes, bytearray or memoryview);
        `framed`: each is preceded by its 8-byte ring-buffer header (`FRAMED_EVENT`)."""
        if wall_offset_ns is None:
            wall_offset_ns = monotonic_to_wall_offset()
        if time.monotonic() - self._peers_at > self.cache_ttl:
            self.invalidate()
        if len(self._ip_text) > self.cache_max:
            self._ip_text.clear()
        self._services.clear()
        ip_text = self._ip_text
        peers = self._peers
        peer_of = self.peer
        verdicts = VERDICT_BY_CODE
        swap = SWAP16
        counts = self._code_counts
        node = self.node_name
        ntoa = socket.inet_ntoa
        out: list[Flow] = []
        append = out.append
        # every field is given, so the tuple is built directly (NamedTuple's generated
        # __new__ is a Python frame per event); `_FLOW_FIELDS` guards the field count
        new = tuple.__new__
        for (ts, kind, reason, direction, flags, ep_id, proxy_port, sid, did, saddr, daddr,
             sport, dport, proto, tcp_flags, ifindex, pkt_len,
             rev_nat) in (FRAMED_EVENT if framed else EVENT).iter_unpack(buf):
            src_ip = ip_text.get(saddr)
            if src_ip is None:
                src_ip = ip_text[saddr] = ntoa(saddr)
            dst_ip = ip_text.get(daddr)
            if dst_ip is None:
                dst_ip = ip_text[daddr] = ntoa(daddr)
            code = kind << 8 | reason
            verdict, drop = verdicts[code]
            if direction:  # egress: the event's endpoint is the source
                src = peers.get((src_ip, sid, ep_id)) or peer_of(src_ip, sid, ep_id)
                dst = peers.get((dst_ip, did, 0)) or peer_of(dst_ip, did, 0)
            else:
                src = peers.get((src_ip, sid, 0)) or peer_of(src_ip, sid, 0)
                dst = peers.get((dst_ip, did, ep_id)) or peer_of(dst_ip, did, ep_id)
            if proto == 1:  # ICMP: be16 (type << 8 | code) in dport; sport unused
                dport = swap[dport]
                sport, dport = dport >> 8, dport & 0xFF
            else:
                sport, dport = swap[sport], swap[dport]
            code = code << 8 | direction
            counts[code] = counts.get(code, 0) + 1
            append(new(Flow, (ts + wall_offset_ns, node, kind, reason, verdict, drop, direction,
                              bool(flags & FLAG_REPLY), ep_id, proxy_port, sid, did, src_ip,
                              dst_ip, sport, dport, proto, tcp_flags, ifindex, pkt_len, src, dst,
                              None, bool(flags & FLAG_ENCRYPTED),
                              self.service(rev_nat) if rev_nat else None)))
        self.decoded += len(out)
        return out


def encode_event(*, ts_ns: int = 0, type: int = EVENT_TRACE, reason: int = 0,
                 direction: int = 0, flags: int = 0, ep_id: int = 0, proxy_port: int = 0,
                 src_identity: int = 0, dst_identity: int = 0, saddr: str = "0.0.0.0",
                 daddr: str = "0.0.0.0", sport: int = 0, dport: int = 0, protocol: int = 6,
                 tcp_flags: int = 0, ifindex: int = 0, pkt_len: int = 0,
                 icmp_type: int | None = None, icmp_code: int = 0, rev_nat: int = 0) -> bytes:
    """Bytes of one `struct pylium_event` exactly as the datapath writes it (for tests and
    the bench). For ICMP pass `icmp_type`/`icmp_code` (sent as dport = type << 8 | code)."""
    if icmp_type is not None:
        dport = (icmp_type << 8) | icmp_code
    raw = bytearray(EVENT_SIZE)
    struct.pack_into("<QBBBBHHII", raw, 0, ts_ns, type, reason, direction, flags, ep_id,
                     proxy_port, src_identity, dst_identity)
    raw[24:28] = socket.inet_aton(saddr)
    raw[28:32] = socket.inet_aton(daddr)
    struct.pack_into(">HH", raw, 32, sport, dport)
    struct.pack_into("<BBHIIH", raw, 36, protocol, tcp_flags, 0, ifindex, pkt_len, rev_nat)
    return bytes(raw)
