"""The flow ring's loss accounting and the observe filters."""

from __future__ import annotations

import asyncio
import time

import pytest
from pylium.errors import UserError
from pylium.flow.component import FlowObserver
from pylium.flow.decode import Decoder, encode_event
from pylium.flow.filters import parse_query, parse_time
from pylium.flow.model import LOST_AGENT, LOST_FOLLOWER, Flow, LostEvent
from pylium.flow.ring import FlowRing

from .flow_starwars import starwars_events, starwars_resolver


def _flows(n: int) -> list[Flow]:
    raw = b"".join(encode_event(type=2, saddr="10.0.0.1", daddr="10.0.0.2", sport=i % 65536,
                                dport=80) for i in range(n))
    return Decoder("n").decode(raw)


def test_ring_keeps_the_newest_and_tells_a_late_reader_exactly_what_it_missed():
    ring = FlowRing(capacity=100)
    ring.extend(_flows(60))
    ring.extend(_flows(70))
    assert ring.head == 130 and len(ring) == 100
    records, missed, nxt = ring.read(0)
    assert missed == 30 and len(records) == 100 and nxt == 130
    assert [r.sport for r in records[:3]] == [30, 31, 32]  # oldest kept: the 31st flow
    ring.extend(_flows(250))  # one batch bigger than the ring
    records, missed, nxt = ring.read(130)
    assert missed == 150 and len(records) == 100 and nxt == 380
    assert records[-1].sport == 249


def test_slow_follower_gets_an_exact_lost_event():
    async def scenario():
        ring = FlowRing(capacity=50)
        agen = ring.follow(start=0)
        ring.extend(_flows(10))
        first = await agen.__anext__()
        assert len(first) == 10 and all(type(r) is Flow for r in first)
        ring.extend(_flows(200))  # the reader sleeps through 200: 150 overwritten
        second = await agen.__anext__()
        assert type(second[0]) is LostEvent
        assert second[0].source == LOST_FOLLOWER and second[0].num_events_lost == 150
        assert len(second) == 1 + 50
        await agen.aclose()
        return ring.follower_lost

    assert asyncio.run(scenario()) == 150


def test_observer_counts_a_torn_record_as_agent_loss():
    obs = FlowObserver("n")
    raw = b"".join(starwars_events())
    assert obs.ingest(raw + raw[:10]) == 4
    assert obs.malformed == 1
    assert obs.ring.lost_by_source == {LOST_AGENT: 1}


def _starwars_flows() -> list[Flow]:
    return Decoder("n", starwars_resolver).decode(b"".join(starwars_events()))


def _select(**params) -> list:
    q = parse_query({k: v if isinstance(v, list) else [str(v)] for k, v in params.items()})
    return q.select(_starwars_flows())


@pytest.mark.parametrize("params,expected", [
    ({"verdict": "DROPPED"}, [(1003, 3), (1003, 1)]),
    ({"verdict": ["forwarded"]}, [(1002, 3), (1002, 2)]),
    ({"pod": "xwing"}, [(1003, 3), (1003, 1)]),
    ({"pod": "default/tie"}, [(1002, 3), (1002, 2)]),
    ({"pod": "kube-system/"}, []),
    ({"to_pod": "xwing"}, []),
    ({"from_pod": "xwing", "verdict": "DROPPED"}, [(1003, 3), (1003, 1)]),
    ({"label": "org=alliance"}, [(1003, 3), (1003, 1)]),
    ({"from_label": "k8s:class=tiefighter"}, [(1002, 3), (1002, 2)]),
    ({"to_label": "org=alliance"}, []),
    ({"label": "org!=empire"}, [(1003, 3), (1003, 1)]),
    ({"identity": "1002"}, [(1002, 3), (1002, 2)]),
    ({"ip": "10.200.0.12"}, [(1003, 3), (1003, 1)]),
    ({"from_ip": "10.200.0.0/24", "to_ip": "10.200.0.12"}, []),
    ({"port": "40000"}, [(1002, 3), (1002, 2)]),
    ({"to_port": "80"}, [(1002, 3), (1002, 2), (1003, 3), (1003, 1)]),
    ({"protocol": "udp"}, []),
    ({"protocol": ["udp", "tcp"], "verdict": "DROPPED"}, [(1003, 3), (1003, 1)]),
    ({"http_method": "GET"}, []),
    ({"traffic_direction": "egress"}, []),
    ({"last": "1"}, [(1003, 1)]),
    ({"first": "1"}, [(1002, 3)]),
])
def test_filters(params, expected):
    got = [(f.src_identity, f.kind) for f in _select(**params)]
    assert got == expected


def test_lost_events_always_pass_filters():
    q = parse_query({"verdict": ["DROPPED"], "pod": ["nothing-matches"]})
    lost = LostEvent(time.time_ns(), "n", "PERF_EVENT_RING_BUFFER", 5)
    assert q.select([lost, *_starwars_flows()]) == [lost]


def test_since_until_and_parse_errors():
    now = time.time_ns()
    assert parse_time("5m", "since", now) == now - 300 * 10**9
    assert parse_time("1h30m", "since", now) == now - 5400 * 10**9
    assert parse_time("2026-11-22T03:04:05Z", "since") == 1795316645 * 10**9
    assert parse_time("2026-11-22T04:04:05.5+01:00", "since") == 1795316645 * 10**9 + 5 * 10**8
    flows = _starwars_flows()
    assert parse_query({"since": ["1m"]}).select(flows) == flows
    assert parse_query({"until": ["1m"]}).select(flows) == []
    for params, field in [({"since": ["yesterday"]}, "since"), ({"verdict": ["MAYBE"]}, "verdict"),
                          ({"port": ["99999"]}, "port"), ({"ip": ["10.0.0.300"]}, "ip"),
                          ({"podd": ["x"]}, "podd"), ({"http_path": ["("]}, "http_path"),
                          ({"http_status": ["2xx"]}, "http_status"),
                          ({"last": ["-1"]}, "last")]:
        with pytest.raises(UserError, match=f"^{field}: "):
            parse_query(params)


def test_default_is_last_20():
    raw = b"".join(starwars_events() * 10)
    flows = Decoder("n").decode(raw)
    assert len(parse_query({}).select(flows)) == 20
    assert len(parse_query({"since": ["1h"]}).select(flows)) == 40


def test_l7_flows_from_a_proxy_are_hubble_l7_and_filterable():
    from pylium.flow.model import compact_line, to_response

    obs = FlowObserver("n", starwars_resolver)
    obs.ingest(b"".join(starwars_events()))
    obs.record_l7(src_ip="10.200.0.11", dst_ip="10.200.0.10", sport=40000, dport=80,
                  src_identity=1002, dst_identity=1001, ep_id=11, verdict="DROPPED",
                  l7={"type": "REQUEST", "http": {"method": "PUT",
                                                  "url": "http://deathstar/v1/exhaust-port"}})
    obs.record_l7(src_ip="10.200.0.11", dst_ip="10.200.0.10", sport=40001, dport=80,
                  src_identity=1002, dst_identity=1001, ep_id=11, verdict="FORWARDED",
                  l7={"type": "REQUEST", "http": {"method": "POST",
                                                  "url": "http://deathstar/v1/request-landing"}})
    records = obs.ring.snapshot()

    def sel(**params):
        return parse_query({k: [v] for k, v in params.items()}).select(records)

    (put,) = sel(http_method="put")
    f = to_response(put)["flow"]
    assert f["Type"] == "L7" and f["event_type"] == {"type": 129}
    assert f["l7"]["http"] == {"method": "PUT", "url": "http://deathstar/v1/exhaust-port"}
    assert f["source"]["pod_name"] == "tiefighter" and f["verdict"] == "DROPPED"
    assert compact_line(to_response(put)).endswith(
        "http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)")
    assert [r.sport for r in sel(http_path="^/v1/request")] == [40001]
    for code, sport in ((403, 40000), (200, 40001)):
        obs.record_l7(src_ip="10.200.0.10", dst_ip="10.200.0.11", sport=80, dport=sport,
                      src_identity=1001, dst_identity=1002, ep_id=11, verdict="FORWARDED",
                      is_reply=True, l7={"type": "RESPONSE", "http": {"code": code}})
    records = obs.ring.snapshot()
    assert [r.dport for r in sel(http_status="403")] == [40000]
    assert [r.dport for r in sel(http_status="2+")] == [40001]
    assert {r.dport for r in sel(http_status="40+")} == {40000}
    assert sel(http_status="5+") == []
    assert len(sel(protocol="http")) == 4
    # L4 flows plus the four L7 ones (HTTP rides on TCP)
    assert len(parse_query({"protocol": ["tcp"], "last": ["100"]}).select(records)) == 8
    with pytest.raises(ValueError, match="verdict"):
        obs.record_l7(src_ip="1.1.1.1", dst_ip="2.2.2.2", sport=1, dport=2, src_identity=0,
                      dst_identity=0, verdict="MAYBE", l7={})


def test_l7_flows_recorded_at_once_equal_those_recorded_one_by_one():
    """`record_l7_many` (a proxy batch) gives the flows and counts `record_l7` gives each,
    and skips, counted, what `record_l7` refuses."""
    records = [
        {"src_ip": "10.200.0.11", "dst_ip": "10.200.0.10", "sport": 40000, "dport": 80,
         "src_identity": 1002, "dst_identity": 1001, "ep_id": 11, "verdict": "DROPPED",
         "direction": 0, "is_reply": False, "proxy_port": 10080,
         "l7": {"type": "REQUEST", "http": {"method": "PUT", "url": "http://d/x"}}},
        {"src_ip": "10.200.0.10", "dst_ip": "10.200.0.11", "sport": 80, "dport": 40001,
         "src_identity": 1001, "dst_identity": 1002, "ep_id": 11, "verdict": "FORWARDED",
         "direction": 1, "is_reply": True, "op": "flow", "seq": 7,
         "l7": {"type": "RESPONSE", "http": {"code": 200}}}]
    one, many = FlowObserver("n", starwars_resolver), FlowObserver("n", starwars_resolver)
    fields = ("src_ip", "dst_ip", "sport", "dport", "src_identity", "dst_identity",
              "verdict", "l7", "ep_id", "direction", "is_reply", "proxy_port")
    for r in records:
        one.record_l7(**{k: r[k] for k in fields if k in r})
    bad = {**records[0], "verdict": "MAYBE"}
    assert many.record_l7_many([records[0], bad, {"verdict": "FORWARDED"}, records[1]]) == 2

    def comparable(flow):
        return flow._replace(**{flow._fields[0]: 0})
    assert [comparable(f) for f in many.ring.snapshot()] == \
        [comparable(f) for f in one.ring.snapshot()]
    assert many.decoder.counts == one.decoder.counts


def test_component_without_a_datapath_says_why(tmp_path):
    import types

    from pylium.flow import component

    daemon = types.SimpleNamespace(
        components={}, kvstore=None,
        config=types.SimpleNamespace(node_name="n1", bpffs_root=tmp_path / "nothing",
                                     prometheus_serve_addr=""))
    observer = asyncio.run(component.start(daemon))
    assert observer.status == "not attached: the datapath component is not running"
    assert observer.reader is None and observer.stats()["decoded"] == 0
    asyncio.run(observer.close())
