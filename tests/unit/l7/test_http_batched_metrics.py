"""The HTTP plugin counts a batch's fast-path responses a run at once (`observe_fast`:
labels from each side's memo, latencies off the records' ends, histograms bucketed per
run): every count, bucket and sum is exactly what decoding each response whole and
`observe`-ing it one by one gives, at bucket bounds, for mixed codes, methods,
directions and connections, and around records that are not laid out as the fast path
lays them out."""

from __future__ import annotations

import math
import random

import orjson
from prometheus_client import CollectorRegistry
from pylium.l7.backend import LocalHistogram
from pylium.l7.supervisor import ConnSide
from pylium_l7_http.backend import HttpMetrics

BOUNDS = LocalHistogram("bounds_probe", "", [], CollectorRegistry()).bounds


def _response(method: str, url: str, code: int, latency: bytes, headers: bytes = b"") -> bytes:
    """A response's members as the parser's fast path writes them."""
    return (b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"%b","url":"%b",'
            b'"code":%d,"protocol":"HTTP/1.1","headers":[{"key":"Server","value":"nginx"}%b]},'
            b'"latency_ns":%b}' % (method.encode(), url.encode(), code, headers, latency))


REQUEST = (b'"verdict":"FORWARDED","rule":"r","l7":{"type":"REQUEST","http":{"method":"GET",'
           b'"url":"http://svc/x","protocol":"HTTP/1.1","headers":[]}}')


def _sides(connections: int) -> list[tuple[ConnSide, ConnSide]]:
    out = []
    for i in range(connections):
        base = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "sport": 40000 + i, "dport": 80,
                "src_identity": 2, "dst_identity": 1000, "ep_id": 1, "proxy_port": 1,
                "direction": i % 2}
        out.append((ConnSide({**base, "is_reply": False}), ConnSide({**base, "is_reply": True})))
    return out


def _latencies() -> list[bytes]:
    """On, just below and just above every bucket bound (in ns), zero, and the long and
    odd ones the run's parse leaves to the one-by-one path."""
    out = []
    for bound in BOUNDS:
        ns = round(bound * 1e9)
        out += [b"%d" % ns, b"%d" % (ns - 1), b"%d" % (ns + 1)]
    return out + [b"0", b"1", b"999999999999999", b"1234567890123456", b"42"]


def _batches(seed: int) -> list[tuple[list[ConnSide], list[bytes]]]:
    """Batches of requests and responses over several connections, each connection
    mostly repeating its last response's labels, sometimes not."""
    rng = random.Random(seed)
    conns = _sides(7)
    latencies = _latencies()
    labels = [("GET", "http://svc/x", 200), ("GET", "http://svc/x", 404),
              ("POST", "http://svc/p", 201), ("GET", "http://svc/y?q=%22a%22", 503)]
    batches = []
    for _ in range(6):
        sides, members = [], []
        for n in range(rng.randrange(40, 120)):
            request, reply = rng.choice(conns)
            sides.append(request)
            members.append(REQUEST)
            method, url, code = (labels[n] if n < len(labels) else labels[0]
                                 if rng.random() < 0.97 else rng.choice(labels))
            sides.append(reply)
            members.append(_response(method, url, code, rng.choice(latencies)))
        batches.append((sides, members))
    # then the odd ones in the middle of a run of fast ones
    sides, members = batches[-1]
    odd = [_response("GET", "http://svc/x", 200, b"5.5"),  # not an int
           _response("GET", "http://svc/x", 200, b"1e3"),
           _response("GET", "http://svc/x", 200, b"12 "),  # int() takes it, JSON too
           _response("GET", "http://svc/x", 0, b"5"),  # no status: not counted
           b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":{"method":"GET",'
           b'"code":200,"protocol":"HTTP/1.1"},"latency_ns":5}',  # no headers
           _response("GET", "http://svc/x", 200, b"5", b',{"key":"X","value":"}\\u001e"}')]
    for i, fields in enumerate(odd):
        at = 2 * (len(members) // 4 + 5 * i) + 1
        members.insert(at, fields)
        sides.insert(at, sides[at - 2] if sides[at - 2].reply else sides[at - 1])
    return batches


def _one_by_one(metrics: HttpMetrics, sides: list[ConnSide], members: list[bytes]) -> None:
    """The reference: each record decoded whole, then `observe`."""
    for side, fields in zip(sides, members, strict=True):
        flow = side.base.copy()
        flow.update(orjson.loads(b"{%b}" % fields))
        metrics.observe(flow)


def test_batched_responses_count_exactly_as_each_decoded_whole():
    batches = _batches(seed=1)
    fast, whole = HttpMetrics(CollectorRegistry()), HttpMetrics(CollectorRegistry())
    runs = []
    take_run = fast._observe_run

    def observe_run(sides, responses, memos):
        runs.append(len(responses))
        take_run(sides, responses, memos)
    fast._observe_run = observe_run
    for sides, members in batches:
        fast.observe_fast(sides, members)
        _one_by_one(whole, sides, members)
        # counts, buckets and sums the same, at every batch (and in the same order)
        assert list(fast.requests.counts.items()) == list(whole.requests.counts.items())
        assert list(fast.duration.data.items()) == list(whole.duration.data.items())
    assert max(runs) >= 20  # most responses were taken a run at once
    counts = fast.requests.counts
    assert counts[("GET", "HTTP/1.1", "200", "server")] > 100
    assert counts[("GET", "HTTP/1.1", "200", "client")] > 100
    assert {key[2] for key in counts} == {"200", "404", "201", "503"}
    entry = fast.duration.data[("GET", "server")]
    assert all(entry[:-1]) and entry[-1] > 0  # every bucket, +Inf too, was hit


def test_a_run_is_the_same_whatever_the_batches_are_cut_into():
    """The same records as one batch or as many give the same metrics (the sums too:
    their values are added in the records' order either way)."""
    batches = _batches(seed=2)
    sides = [s for batch in batches for s in batch[0]]
    members = [m for batch in batches for m in batch[1]]
    one, many = HttpMetrics(CollectorRegistry()), HttpMetrics(CollectorRegistry())
    one.observe_fast(sides, members)
    for batch_sides, batch_members in batches:
        many.observe_fast(batch_sides, batch_members)
    whole = HttpMetrics(CollectorRegistry())
    _one_by_one(whole, sides, members)
    assert one.requests.counts == many.requests.counts == whole.requests.counts
    assert one.duration.data == many.duration.data == whole.duration.data


def test_observe_many_buckets_and_adds_as_observe_does_one_by_one():
    values = [b for b in BOUNDS] + [math.nextafter(b, 0) for b in BOUNDS] + \
             [math.nextafter(b, math.inf) for b in BOUNDS] + [0.0, 1e-9, 123.0, 1e9]
    random.Random(3).shuffle(values)
    many = LocalHistogram("t_many", "", ["m"], CollectorRegistry())
    each = LocalHistogram("t_each", "", ["m"], CollectorRegistry())
    for chunk in (values[:7], values[7:], values[:1], []):
        many.observe_many(("GET",), chunk)
        for value in chunk:
            each.observe(("GET",), value)
        assert many.data == each.data
    assert many.data[("GET",)][-2] == 3  # 123.0 and 1e9 and just above the last bound


def test_latencies_int_reads_but_json_does_not_count_as_read_one_by_one():
    """Digits JSON refuses (leading zeros) are still read as `int` reads them, as the
    one-by-one path (`_observe_each`) reads them."""
    (request, reply), = _sides(1)
    members = [_response("GET", "http://svc/x", 200, latency)
               for latency in (b"5", b"007", b"0", b"0012000000", b"5")] * 4
    sides = [reply] * len(members)
    runs, each = HttpMetrics(CollectorRegistry()), HttpMetrics(CollectorRegistry())
    for metrics in (runs, each):
        metrics.observe_fast(sides[:1], members[:1])  # the side's memo
    taken = []
    take_run = runs._observe_run
    runs._observe_run = lambda *run: taken.append(len(run[1])) or take_run(*run)
    runs.observe_fast(sides, members)
    each._observe_each(sides, members)
    assert taken == [len(members)]
    assert runs.requests.counts == each.requests.counts
    assert runs.duration.data == each.duration.data
    assert runs.requests.counts[("GET", "HTTP/1.1", "200", "server")] == 21
