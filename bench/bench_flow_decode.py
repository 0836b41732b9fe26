"""Datapath events decoded into flow records by one core: pylium's batch decoder (one
`struct.iter_unpack` per ring-buffer batch, table lookups, enrichment cache) against the
obvious per-event decoder (the datapath's own ctypes mirror of the record,
`pylium.datapath.maps.events.Event`, over each record, then the same flow built field by
field, enrichment asked every time). Both sides take the same bytes and produce the same
flows (checked); rounds alternate (5 each) and medians with their spread are reported."""

from __future__ import annotations

import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, report_rounds  # noqa: E402
from pylium.datapath.maps.events import Event  # noqa: E402
from pylium.flow.component import FlowObserver  # noqa: E402
from pylium.flow.decode import EVENT_SIZE, Decoder, encode_event, monotonic_to_wall_offset  # noqa: E402
from pylium.flow.model import DROP_POLICY_DENIED, NO_PEER, Flow, Peer, to_hubble  # noqa: E402

N_EVENTS = 200_000
BATCH = 4096
PODS = 64
ROUNDS = 5


PEERS = {1000 + i: Peer(identity=1000 + i, namespace="default",
                        labels=(f"k8s:app=svc{i % 8}", "k8s:io.kubernetes.pod.namespace=default"),
                        pod_name=f"pod-{i}") for i in range(PODS)}


def resolver(ip: str, identity: int, ep_id: int) -> Peer | None:
    peer = PEERS.get(identity)
    if peer is not None and ep_id:
        peer = Peer(ID=ep_id, identity=peer.identity, namespace=peer.namespace,
                    labels=peer.labels, pod_name=peer.pod_name)
    return peer


def make_events(n: int) -> bytes:
    rng = random.Random(7)
    out = []
    ts = time.monotonic_ns()
    for i in range(n):
        a, b = rng.randrange(PODS), rng.randrange(PODS)
        kind = rng.choice((1, 2, 2, 3))
        reason = {1: DROP_POLICY_DENIED, 2: rng.choice((0, 5)), 3: rng.choice((1, 2))}[kind]
        proto = rng.choice((6, 6, 17, 1))
        out.append(encode_event(
            ts_ns=ts + i, type=kind, reason=reason, direction=rng.randrange(2),
            flags=rng.randrange(4), ep_id=b + 1, src_identity=1000 + a, dst_identity=1000 + b,
            saddr=f"10.200.0.{a + 2}", daddr=f"10.200.0.{b + 2}", sport=rng.randrange(32768, 61000),
            dport=rng.choice((80, 443, 53, 8080)), protocol=proto, tcp_flags=0x12 if proto == 6 else 0,
            ifindex=b + 3, pkt_len=rng.randrange(60, 1500),
            icmp_type=8 if proto == 1 else None))
    return b"".join(out)


def naive_decode(buf: bytes, node: str) -> list[Flow]:
    """Per record: a ctypes view, byte-order conversions, if/elif verdicts, enrichment."""
    offset = monotonic_to_wall_offset()
    flows = []
    for pos in range(0, len(buf), EVENT_SIZE):
        e = Event.from_buffer_copy(buf, pos)
        if e.type == 1:
            verdict, drop = "DROPPED", e.reason
        elif e.type == 2:
            verdict, drop = "FORWARDED", 0
        elif e.reason == 1:
            verdict, drop = "FORWARDED", 0
        elif e.reason == 2:
            verdict, drop = "DROPPED", DROP_POLICY_DENIED
        elif e.reason == 3:
            verdict, drop = "REDIRECTED", 0
        else:
            verdict, drop = "VERDICT_UNKNOWN", 0
        src_ip = socket.inet_ntoa(bytes(e.saddr))
        dst_ip = socket.inet_ntoa(bytes(e.daddr))
        sport, dport = socket.ntohs(e.sport), socket.ntohs(e.dport)
        if e.protocol == 1:
            sport, dport = dport >> 8, dport & 0xFF
        egress = e.direction == 1
        src = resolver(src_ip, e.src_identity, e.ep_id if egress else 0) or NO_PEER
        dst = resolver(dst_ip, e.dst_identity, 0 if egress else e.ep_id) or NO_PEER
        flows.append(Flow(e.ts_ns + offset, node, e.type, e.reason, verdict, drop, e.direction,
                          bool(e.flags & 1), e.ep_id, e.proxy_port, e.src_identity,
                          e.dst_identity, src_ip, dst_ip, sport, dport, e.protocol, e.tcp_flags,
                          e.ifindex, e.pkt_len, src, dst))
    return flows


def batches(buf: bytes):
    step = BATCH * EVENT_SIZE
    view = memoryview(buf)
    return [view[i:i + step] for i in range(0, len(buf), step)]


def rate(fn) -> Callable[[], float]:
    """`fn` (which returns how many events it handled) as a one-round sampler of events
    per CPU second of this thread (`time.thread_time`): on a machine shared with other
    work, wall time measures the neighbours; CPU time measures the decoder on one core."""
    def sample() -> float:
        t0 = time.thread_time()
        n = fn()
        return n / (time.thread_time() - t0)
    return sample


def main() -> None:
    buf = make_events(N_EVENTS)
    chunks = batches(buf)

    # same flows either way (times aside: each takes its own wall-clock offset)
    ours = Decoder("bench", resolver).decode(buf)
    theirs = naive_decode(buf, "bench")
    assert [f[1:] for f in ours] == [f[1:] for f in theirs], "decoders disagree"

    def pylium_ingest() -> int:
        obs = FlowObserver("bench", resolver, capacity=65536)
        for c in chunks:
            obs.ingest(c)
        assert obs.decoder.decoded == N_EVENTS and obs.malformed == 0
        return N_EVENTS

    def naive() -> int:
        flows = []
        for c in chunks:
            flows.extend(naive_decode(bytes(c), "bench"))
        return len(flows)

    ours, theirs = interleave(rate(pylium_ingest), rate(naive), ROUNDS)
    report_rounds("flow_decode", "events decoded into flows into the agent's ring, one core",
                  "events/cpu-s", ours, theirs,
                  "per-event decode over the datapath's Event ctypes mirror",
                  "higher is better; goal >= 200000 events/s",
                  lambda a, b: a >= 200_000, events=N_EVENTS, batch=BATCH,
                  measures="the same in-memory batches decoded into the same flows")

    def pylium_json() -> int:
        dec = Decoder("bench", resolver)
        n = 0
        for c in chunks:
            for f in dec.decode(c):
                to_hubble(f)
                n += 1
        return n

    def naive_json() -> int:
        n = 0
        for c in chunks:
            for f in naive_decode(bytes(c), "bench"):
                to_hubble(f)
                n += 1
        return n

    ours, theirs = interleave(rate(pylium_json), rate(naive_json), ROUNDS)
    report_rounds("flow_decode", "events decoded and rendered as Hubble JSON dicts, one core",
                  "events/cpu-s", ours, theirs,
                  "per-event decode over the Event mirror + the same JSON rendering",
                  "higher is better; ratio >= 1 (JSON is built only for flows a client asks for)",
                  lambda a, b: a >= b, events=N_EVENTS,
                  measures="the same batches decoded and rendered by the same to_hubble")


def kernel_ring_buffer_bench() -> None:
    """Root only: events read out of a real BPF ring buffer (filled by the burst test's
    program through the datapath's emit_event) into flows: pylium's reader (the ring mapped
    into the process, a batch's headers checked at once and copied out in one piece, then
    decoded per batch) vs the usual libbpf per-event callback that decodes each record
    where it lies (bcc's pattern)."""
    import os
    import tempfile

    if os.geteuid() != 0:
        print("kernel ring-buffer line skipped: needs root", file=sys.stderr)
        return
    from pylium.datapath import libbpf
    from pylium.datapath.loader import load_object
    from pylium.datapath.ringbuf import SAMPLE_FN, MappedRingReader
    from pylium.datapath.ringbuf import libbpf as rb_fns

    src = Path(__file__).resolve().parents[1] / "tests/privileged/flow"
    obj = load_object(src / "burst.bpf.c",
                      cache_dir=Path(tempfile.gettempdir()) / "pylium-bench-bpf-cache")
    try:
        ring_fd = obj.map("events")
        prog_fd = obj.program("burst")
        per_round = 14_000  # fits the 1 MiB ring: nothing is lost while nobody reads
        rounds = ROUNDS
        packet = bytes(64)

        def fill() -> None:
            libbpf.test_run(prog_fd, packet, repeat=per_round)

        def measure(drain) -> Callable[[], float]:
            """One round: fill the ring, then time draining it into flows (CPU time of this
            thread, see `rate`)."""
            def sample() -> float:
                fill()
                t0 = time.thread_time()
                got = drain()
                elapsed = time.thread_time() - t0
                assert got == per_round, (got, per_round)
                return got / elapsed
            return sample

        obs = FlowObserver("bench", resolver, capacity=65536)
        obs.reader = MappedRingReader(ring_fd, EVENT_SIZE, 4096)

        def pylium_drain() -> int:
            before = obs.decoder.decoded
            while obs.pump(0):
                pass
            return obs.decoder.decoded - before

        fns = rb_fns()
        offset = monotonic_to_wall_offset()
        flows: list[Flow] = []

        def per_event(_ctx, data, size) -> int:
            e = Event.from_address(data)
            flows.extend(naive_decode(bytes(e), "bench") if size == EVENT_SIZE else ())
            return 0

        cb = SAMPLE_FN(per_event)
        rb = fns.ring_buffer__new(ring_fd, cb, None, None)

        def naive_drain() -> int:
            flows.clear()
            while fns.ring_buffer__consume(rb) > 0:
                pass
            return len(flows)

        assert offset
        ours, theirs = interleave(measure(pylium_drain), measure(naive_drain), rounds)
        fns.ring_buffer__free(rb)
        obs.reader.close()
        report_rounds("flow_decode", "events read from a real BPF ring buffer into flows, one core",
                      "events/cpu-s", ours, theirs,
                      "libbpf per-event callback decoding each record (bcc style)",
                      "higher is better; goal >= 500000 events/s (issue 16)",
                      lambda a, b: a >= 500_000, events_per_round=per_round,
                      measures="the same program fills the same ring; both drain it "
                               "through libbpf into the same flows")
    finally:
        obj.close()


if __name__ == "__main__":
    main()
    kernel_ring_buffer_bench()
