"""Datapath events → Hubble-compatible flow JSON."""

from __future__ import annotations

import ctypes
import re
import struct
import time
from pathlib import Path

from pylium.datapath.maps.events import Event
from pylium.flow.decode import EVENT_SIZE, FIELDS, Decoder, encode_event
from pylium.flow.model import compact_line, to_response

from .flow_starwars import starwars_events, starwars_resolver

REPO = Path(__file__).resolve().parents[3]


def test_layout_matches_events_h():
    """Every field offset the decoder uses is the one bpf/lib/events.h documents."""
    text = (REPO / "bpf/lib/events.h").read_text()
    body = text[text.index("struct pylium_event {"):]
    body = body[:body.index("};")]
    declared = {m.group(1): int(m.group(2))
                for m in re.finditer(r"(\w+);\s*/\*\s*(\d+)", body)}
    for name, offset, _fmt in FIELDS:
        assert declared[name] == offset, name
    assert max(declared.values()) + 8 == EVENT_SIZE


def test_encoder_matches_a_ctypes_mirror_of_the_c_struct():
    # the datapath's mirror, itself checked against the compiled C (tests/unit/datapath)
    assert ctypes.sizeof(Event) == EVENT_SIZE
    raw = encode_event(ts_ns=5, type=1, reason=133, direction=1, flags=3, ep_id=9,
                       proxy_port=15001, src_identity=70000, dst_identity=2, saddr="10.0.0.1",
                       daddr="10.0.0.2", sport=43210, dport=80, protocol=6, tcp_flags=0x12,
                       ifindex=4, pkt_len=1500)
    ev = Event.from_buffer_copy(raw)
    assert (ev.ts_ns, ev.type, ev.reason, ev.direction, ev.flags, ev.ep_id) == (5, 1, 133, 1, 3, 9)
    assert (ev.proxy_port, ev.src_identity, ev.dst_identity) == (15001, 70000, 2)
    assert bytes(ev.saddr) == bytes([10, 0, 0, 1]) and bytes(ev.daddr) == bytes([10, 0, 0, 2])
    assert struct.unpack(">H", struct.pack("<H", ev.sport))[0] == 43210  # be16 on the wire
    assert (ev.protocol, ev.tcp_flags, ev.ifindex, ev.pkt_len) == (6, 0x12, 4, 1500)


def test_starwars_drop_decodes_to_hubble_json():
    ts = time.monotonic_ns()
    flows = Decoder("node-a", starwars_resolver).decode(b"".join(starwars_events(ts)))
    assert len(flows) == 4
    verdict, trace, denied, dropped = (to_response(f) for f in flows)
    f = dropped["flow"]
    assert f["verdict"] == "DROPPED"
    assert f["drop_reason"] == 133 and f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["IP"] == {"source": "10.200.0.12", "destination": "10.200.0.10",
                       "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 43210, "destination_port": 80,
                               "flags": {"SYN": True}}}
    assert f["source"]["pod_name"] == "xwing" and f["source"]["identity"] == 1003
    assert "k8s:org=alliance" in f["source"]["labels"]
    assert f["destination"]["pod_name"] == "deathstar" and f["destination"]["ID"] == 11
    assert "k8s:org=empire" in f["destination"]["labels"]
    assert f["Type"] == "L3_L4" and f["node_name"] == "node-a"
    assert f["traffic_direction"] == "INGRESS" and f["is_reply"] is False
    assert f["event_type"] == {"type": 1, "sub_type": 133}
    # wall-clock time: monotonic stamp + the boot offset
    wall = time.time_ns()
    assert f["time"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(wall / 1e9)))
    assert abs(flows[3].time_ns - wall) < 5_000_000_000
    assert denied["flow"]["verdict"] == "DROPPED"
    assert denied["flow"]["event_type"] == {"type": 5}
    assert verdict["flow"]["verdict"] == "FORWARDED"
    assert trace["flow"]["trace_observation_point"] == "TO_ENDPOINT"


def test_compact_lines_read_like_hubble():
    flows = Decoder("n", starwars_resolver).decode(b"".join(starwars_events()))
    lines = [compact_line(to_response(f)) for f in flows]
    assert re.fullmatch(
        r"\w{3} \d\d \d\d:\d\d:\d\d\.\d{3}: default/xwing:43210 \(ID:1003\) -> "
        r"default/deathstar:80 \(ID:1001\) Policy denied DROPPED \(TCP Flags: SYN\)", lines[3])
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)" in lines[2]
    assert "default/tiefighter:40000 (ID:1002) -> default/deathstar:80" in lines[1]
    assert lines[1].endswith("to-endpoint FORWARDED (TCP Flags: SYN)")


def test_udp_icmp_reply_egress_and_unknown_peers():
    raw = b"".join([
        encode_event(type=2, reason=5, direction=1, flags=1, ep_id=3, src_identity=4242,
                     saddr="10.0.0.5", daddr="8.8.8.8", sport=5353, dport=53, protocol=17),
        encode_event(type=2, reason=3, direction=1, ep_id=3, saddr="10.0.0.5",
                     daddr="10.0.0.6", protocol=1, icmp_type=8, icmp_code=0),
        encode_event(type=3, reason=3, direction=1, ep_id=3, proxy_port=15001, protocol=6,
                     saddr="10.0.0.5", daddr="10.0.0.7", sport=1, dport=8080),
    ])
    udp, icmp, redirect = (to_response(f)["flow"] for f in Decoder("n").decode(raw))
    assert udp["l4"] == {"UDP": {"source_port": 5353, "destination_port": 53}}
    assert udp["is_reply"] is True and udp["traffic_direction"] == "EGRESS"
    assert udp["trace_observation_point"] == "FROM_ENDPOINT"
    assert udp["source"] == {"identity": 4242}  # no resolver: the identity alone
    assert icmp["l4"] == {"ICMPv4": {"type": 8, "code": 0}}
    assert icmp["Summary"] == "ICMPv4 EchoRequest"
    assert redirect["verdict"] == "REDIRECTED" and redirect["proxy_port"] == 15001


def test_resolver_failure_is_tolerated_and_counted():
    def broken(ip, identity, ep_id):
        raise RuntimeError("identity store away")

    dec = Decoder("n", broken)
    flows = dec.decode(b"".join(starwars_events()))
    assert len(flows) == 4 and dec.resolver_errors > 0
    assert flows[3].source.identity == 1003 and flows[3].source.pod_name == ""


def test_decoder_counts_for_metrics():
    dec = Decoder("n", starwars_resolver)
    dec.decode(b"".join(starwars_events() * 3))
    assert dec.counts[(1, "DROPPED", 133, 0)] == 3
    assert dec.counts[(3, "DROPPED", 133, 0)] == 3
    assert dec.counts[(3, "FORWARDED", 0, 0)] == 3
    assert dec.counts[(2, "FORWARDED", 0, 0)] == 3
    assert dec.decoded == 12


def test_service_flows_name_their_service_and_show_the_translation():
    """A translated flow's event carries the service's rev-NAT index; the decoder names the
    service (Hubble's destination_service) and the compact line shows VIP => backend."""
    from pylium.flow.model import ServiceRef

    asked = []

    def services(index):
        asked.append(index)
        return {7: ServiceRef("deathstar", "default", "10.96.0.10:80/TCP")}.get(index)

    ts = time.monotonic_ns()
    events = [encode_event(ts_ns=ts, type=2, reason=5, direction=1, flags=2, saddr="10.200.0.12",
                           daddr="10.200.0.10", sport=43210, dport=80, tcp_flags=0x02,
                           rev_nat=7),
              encode_event(ts_ns=ts, type=1, reason=133, flags=1, saddr="10.96.0.10",
                           daddr="10.200.0.12", sport=80, dport=43210, rev_nat=7),
              encode_event(ts_ns=ts, type=2, reason=5, direction=1, saddr="10.200.0.12",
                           daddr="10.200.0.10", sport=43211, dport=80, rev_nat=9),
              encode_event(ts_ns=ts, type=2, reason=5, direction=1, saddr="10.200.0.12",
                           daddr="10.200.0.10", sport=43212, dport=80)]
    decoder = Decoder("node-a", services=services)
    forward, reply, unknown, plain = (to_response(f) for f in decoder.decode(b"".join(events)))
    assert asked == [7, 9]  # once per index in a batch; index 0 (no service) never asked
    decoder.decode(events[0])
    assert asked == [7, 9, 7]  # asked again next batch: a deleted service's id is reused
    f = forward["flow"]
    assert f["destination_service"] == {"name": "deathstar", "namespace": "default"}
    assert f["service_frontend"] == "10.96.0.10:80/TCP" and "source_service" not in f
    assert f["IP"]["destination"] == "10.200.0.10"  # the event saw the backend
    line = compact_line(forward)
    assert "-> 10.96.0.10:80 (service default/deathstar) => 10.200.0.10:80" in line, line
    r = reply["flow"]
    assert r["source_service"] == {"name": "deathstar", "namespace": "default"}
    assert "destination_service" not in r
    assert "10.96.0.10:80 (service default/deathstar) <- 10.200.0.12:43210" in compact_line(reply)
    for resp in (unknown, plain):  # a stale index (service gone) and a plain flow
        assert "destination_service" not in resp["flow"] and "=>" not in compact_line(resp)


def test_service_filters_match_the_side_the_service_is_on():
    """`observe --to-service ns/name` (Hubble's flag): forward flows through the service;
    `--from-service` its replies; `--service` either."""
    from pylium.flow.filters import parse_query
    from pylium.flow.model import ServiceRef

    ref = {7: ServiceRef("deathstar", "default", "10.96.0.10:80/TCP")}
    ts = time.monotonic_ns()
    fwd, reply, plain = Decoder("n", services=ref.get).decode(b"".join([
        encode_event(ts_ns=ts, type=2, direction=1, rev_nat=7, dport=80),
        encode_event(ts_ns=ts, type=1, reason=133, flags=1, rev_nat=7, sport=80),
        encode_event(ts_ns=ts, type=2, direction=1, dport=80)]))
    flows = [fwd, reply, plain]

    def pick(**params):
        return parse_query({k: [v] for k, v in params.items()}).select(flows)

    assert pick(to_service="default/deathstar") == [fwd]
    assert pick(to_service="deathst") == [fwd]  # a name prefix, any namespace
    assert pick(from_service="default/") == [reply]
    assert pick(service="default/death") == [fwd, reply]
    assert pick(to_service="kube-system/deathstar") == []
