"""The flow ring keeps a proxy's L7 flows as their parts (`FlowRing.extend_l7`) and builds
them when read: whatever is appended, in whatever batches and wherever the ring wraps, a
reader gets the records an eager ring (every flow built on append) would give."""

from __future__ import annotations

import asyncio
import random

import pytest
from pylium.flow.component import FlowObserver
from pylium.flow.decode import Decoder, encode_event
from pylium.flow.model import Flow, L7Flow, LostEvent, l7_flow
from pylium.flow.ring import FlowRing

BASE = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "sport": 40000, "dport": 80,
        "src_identity": 1001, "dst_identity": 1002, "ep_id": 7, "direction": 0}


def _raw(i: int) -> bytes:
    return (b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"code":200,'
            b'"method":"GET","url":"/%d"},"latency_ns":%d}' % (i, 1000 + i))


def _heads() -> list[tuple]:
    obs = FlowObserver("n")
    return [obs.l7_head(dict(BASE, sport=40000 + i, is_reply=bool(i % 2))) for i in range(4)]


def _kernel_flows(rng: random.Random, n: int) -> list[Flow]:
    raw = b"".join(encode_event(type=2, saddr="10.0.0.1", daddr="10.0.0.3",
                                sport=rng.randrange(65536), dport=443) for _ in range(n))
    return Decoder("n").decode(raw)


def test_a_lazy_l7_flow_reads_as_the_flow_built_from_its_parts():
    ring = FlowRing(capacity=8)
    heads = _heads()
    ring.extend_l7(123, heads[:2], [_raw(1), _raw(2)])
    got = ring.snapshot()
    assert [type(f) for f in got] == [L7Flow, L7Flow]
    assert got == [l7_flow(123, heads[0], _raw(1)), l7_flow(123, heads[1], _raw(2))]
    first = got[0]
    assert first.time_ns == 123 and first.node_name == "n" and first.sport == 40000
    assert first.encrypted is False and first.service is None
    assert first.l7 == {"type": "RESPONSE", "http": {"code": 200, "method": "GET", "url": "/1"},
                        "latency_ns": 1001}


def test_heads_and_records_must_pair_up():
    ring = FlowRing(capacity=8)
    with pytest.raises(ValueError, match="2 L7 records with 1 heads"):
        ring.extend_l7(1, _heads()[:1], [_raw(1), _raw(2)])
    with pytest.raises(ValueError, match="1 L7 records with 2 heads"):
        FlowObserver("n").record_l7_raw(_heads()[:2], [_raw(1)])
    with pytest.raises(ValueError, match="1 L7 records with 1 heads, 2 prefixes"):
        ring.extend_l7(1, _heads()[:1], [_raw(1)], [b"", b""])
    assert ring.head == 0 and ring.snapshot() == []


@pytest.mark.parametrize("seed", range(6))
def test_any_mix_of_batches_reads_as_an_eager_ring(seed):
    rng = random.Random(seed)
    capacity = rng.choice([1, 5, 16, 37])
    ring = FlowRing(capacity=capacity)
    heads = _heads()
    everything: list = []  # what an eager ring would have held, ever
    cursor = 0
    for step in range(60):
        kind, n = rng.randrange(3), rng.choice([0, 1, 2, 3, capacity - 1, capacity,
                                                capacity + 3, 2 * capacity + 1])
        n = max(n, 0)
        if kind == 0:
            hs = [rng.choice(heads) for _ in range(n)]
            raws = [_raw(rng.randrange(10_000)) for _ in range(n)]
            everything += [l7_flow(step, h, r) for h, r in zip(hs, raws, strict=True)]
            if rng.random() < 0.5:  # records in two parts (a proxy's recurring prefix)
                cuts = [rng.randrange(len(r) + 1) for r in raws]
                ring.extend_l7(step, hs, [r[c:] for r, c in zip(raws, cuts, strict=True)],
                               [r[:c] for r, c in zip(raws, cuts, strict=True)])
            else:
                ring.extend_l7(step, hs, raws)
        elif kind == 1:
            flows = _kernel_flows(rng, n)
            ring.extend(flows, flows_only=True)
            everything += flows
        else:
            ring.append_lost("HUBBLE_RING_BUFFER", n, cpu=None)
            everything += [LostEvent(0, "n", "HUBBLE_RING_BUFFER", n)] if n else []
        assert ring.head == len(everything)
        kept = everything[-capacity:]
        snap = ring.snapshot()
        assert [_comparable(r) for r in snap] == [_comparable(r) for r in kept]
        assert all(type(a) is type(b) for a, b in zip(snap, kept, strict=True))
        records, missed, nxt = ring.read(cursor)
        oldest = max(0, len(everything) - capacity)
        assert missed == max(0, oldest - cursor) and nxt == len(everything)
        assert ([_comparable(r) for r in records]
                == [_comparable(r) for r in everything[max(cursor, oldest):]])
        if rng.random() < 0.5:
            cursor = nxt


def test_a_follower_gets_lazy_flows_built():
    async def scenario():
        ring = FlowRing(capacity=4)
        agen = ring.follow(start=0)
        heads = _heads()
        ring.extend_l7(5, heads[:3], [_raw(1), _raw(2), _raw(3)])
        first = await agen.__anext__()
        ring.extend_l7(6, [heads[0]] * 5, [_raw(i) for i in range(4, 9)])  # 1 overwritten
        second = await agen.__anext__()
        await agen.aclose()
        return first, second

    first, second = asyncio.run(scenario())
    assert [f.l7["http"]["url"] for f in first] == ["/1", "/2", "/3"]
    assert type(second[0]) is LostEvent and second[0].num_events_lost == 1
    assert [f.l7["http"]["url"] for f in second[1:]] == ["/5", "/6", "/7", "/8"]


def _comparable(record):
    """A record without the lost event's clock (appended now, not at a test's step)."""
    if type(record) is LostEvent:
        return ("lost", record.source, record.num_events_lost)
    return tuple(record)
