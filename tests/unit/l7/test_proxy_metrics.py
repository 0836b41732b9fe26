"""The L7 proxy metrics are the core's (`ProxiedParser`), one family for every parser with
its protocol as a label: two parser plugins on one registry count side by side, and the
redirected keys pushed to each proxy show under its protocol."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pylium.api.context import L7Context
from pylium.api.node import NodeInfo
from pylium.l7.backend import ProxiedParser, ProxyMetrics
from pylium.policy.mapstate import PROTO_TCP, Direction, PolicyKey
from pylium.policy.resolve import L7Grant
from pylium_l7_http.backend import L7Http
from pylium_l7_kafka.backend import L7Kafka

NODE = NodeInfo("n", "10.0.0.1", "10.0.0.0/24")


class _Policy:
    """The L7 policy snapshot of one endpoint with `keys` redirected keys."""

    def __init__(self, protocol: str, keys: int):
        self.protocol, self.keys = protocol, keys

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"ep_id": 9, "ipv4": "10.0.0.9", "identity": 300, "entries": [
            (PolicyKey(301, Direction.INGRESS, PROTO_TCP, 80 + i, 16),
             (L7Grant(rule="r", kind=self.protocol, allow_all=True),))
            for i in range(self.keys)]}]


class _Proxy:
    """Stands in for the proxy process (its policy push is all these tests need; the
    privileged tests run the real one)."""

    how = "spawned"
    info: dict[str, Any] = {}

    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []

    async def push(self, message: dict[str, Any]) -> dict[str, Any]:
        self.pushed.append(message)
        return {"op": "ack"}


def _backend(cls: type[ProxiedParser], registry: CollectorRegistry,
             policy: _Policy | None = None) -> ProxiedParser:
    return cls.from_context(L7Context(name=cls.name, node=NODE, metrics=registry,
                                      policy=policy))


def test_every_parser_counts_requests_under_its_protocol():
    registry = CollectorRegistry()
    http, kafka = _backend(L7Http, registry), _backend(L7Kafka, registry)
    assert http.proxy_metrics is kafka.proxy_metrics is ProxyMetrics.of(registry)
    http._flow({"verdict": "FORWARDED", "l7": {"type": "REQUEST", "http": {"method": "GET"}}})
    kafka._flow({"verdict": "DROPPED", "l7": {"type": "REQUEST", "kafka": {
        "api_key": 0, "error_code": 29, "topic": "t"}}})
    kafka._flow({"verdict": "DROPPED", "is_reply": True, "l7": {"type": "RESPONSE", "kafka": {
        "api_key": 0, "error_code": 29, "topic": "t"}}})
    kafka._flow({"verdict": "DROPPED", "error": "malformed frame", "l7": {
        "type": "REQUEST", "kafka": {"error_code": -1}}})
    get = registry.get_sample_value

    def l7(rule: str, protocol: str) -> float | None:
        return get("pylium_policy_l7_total", {"rule": rule, "protocol": protocol})

    assert (l7("received", "http"), l7("forwarded", "http")) == (1, 1)
    assert l7("denied", "http") is None
    assert (l7("received", "kafka"), l7("denied", "kafka"), l7("parse_errors", "kafka")) \
        == (2, 1, 1)
    assert get("hubble_kafka_requests_total", {"topic": "t", "api_key": "produce",
                                               "error_code": "29", "reporter": "client"}) == 1
    names = {m.name for m in registry.collect()}
    assert "pylium_kafka_proxy_redirects" not in names  # one family, labelled by protocol


def test_redirected_keys_per_protocol():
    registry = CollectorRegistry()
    http = _backend(L7Http, registry, _Policy("http", 2))
    kafka = _backend(L7Kafka, registry, _Policy("kafka", 3))
    for backend in (http, kafka):
        backend.supervisor = _Proxy()
        asyncio.run(backend.push_policy())
        assert backend.supervisor.pushed, "the policy went to the proxy"
    get = registry.get_sample_value
    assert get("pylium_proxy_redirects", {"protocol": "http"}) == 2
    assert get("pylium_proxy_redirects", {"protocol": "kafka"}) == 3


def test_local_families_scrape_exactly_as_prometheus_clients_own():
    """`LocalCounter`/`LocalHistogram` (plain dicts per flow, read when scraped) give the
    samples a prometheus-client Counter/Histogram fed the same values gives."""
    from prometheus_client import Counter, Histogram, generate_latest
    from pylium.l7.backend import LocalCounter, LocalHistogram

    local, reference = CollectorRegistry(), CollectorRegistry()
    counter = LocalCounter("t_requests", "doc", ["method", "code"], local)
    ref_counter = Counter("t_requests", "doc", ["method", "code"], registry=reference)
    histogram = LocalHistogram("t_seconds", "doc", ["method"], local)
    ref_histogram = Histogram("t_seconds", "doc", ["method"], registry=reference)
    values = [0.0001, 0.005, 0.0050001, 0.1, 2.5, 10.0, 11.0, 1e9]
    for i, value in enumerate(values):
        labels = ("GET" if i % 3 else "POST", str(200 + i % 2))
        counter.inc(labels)
        ref_counter.labels(*labels).inc()
        histogram.observe(labels[:1], value)
        ref_histogram.labels(*labels[:1]).observe(value)

    def samples(registry):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                      for m in registry.collect() for s in m.samples
                      if not s.name.endswith("_created"))

    assert samples(local) == samples(reference)
    assert samples(local)  # not two empty lists
    text = generate_latest(local).decode()
    assert 't_requests_total{code="200",method="POST"} 2.0' in text
    assert 't_seconds_bucket{le="0.005",method="GET"} 1.0' in text
    with pytest.raises(ValueError):  # a second family of the name is refused, as before
        LocalCounter("t_requests", "doc", ["method"], local)


def test_a_batch_counts_and_records_exactly_what_its_records_do_one_by_one():
    """The agent takes a proxy batch at once (`_flows`: metrics per record, then one
    `record_l7_many`): the same metrics and flows as `_flow` on each record."""
    from pylium.flow.component import FlowObserver

    base = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "sport": 4000, "dport": 80,
            "src_identity": 2001, "dst_identity": 1001, "ep_id": 3, "direction": 0,
            "proxy_port": 10080, "op": "flow"}
    messages = [
        {**base, "verdict": "FORWARDED", "is_reply": False, "seq": 1,
         "l7": {"type": "REQUEST", "http": {"method": "GET", "protocol": "HTTP/1.1"}}},
        {**base, "verdict": "FORWARDED", "is_reply": True, "seq": 2,
         "l7": {"type": "RESPONSE", "latency_ns": 2000000,
                "http": {"method": "GET", "code": 200, "protocol": "HTTP/1.1"}}},
        {**base, "verdict": "DROPPED", "is_reply": False, "seq": 3,
         "l7": {"type": "REQUEST", "http": {"method": "PUT", "protocol": "HTTP/1.1"}}},
        {**base, "verdict": "DROPPED", "is_reply": False, "seq": 4, "error": "bad",
         "l7": {"type": "REQUEST", "http": {}}}]
    sides = []
    for batched in (False, True):
        registry, flows = CollectorRegistry(), FlowObserver("n")
        http = L7Http.from_context(L7Context(name="http", node=NODE, metrics=registry,
                                             flows=flows))
        if batched:
            http._flows([dict(m) for m in messages])
        else:
            for m in messages:
                http._flow(dict(m))
        samples = sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                         for family in registry.collect() for s in family.samples
                         if not s.name.endswith("_created"))
        ring = [f._replace(time_ns=0) for f in flows.ring.snapshot()]
        sides.append((samples, ring, http.flows_recorded))
    assert sides[0] == sides[1]
    samples, ring, recorded = sides[1]
    assert recorded == 4 and len(ring) == 4
    assert ("pylium_policy_l7_total", (("protocol", "http"), ("rule", "received")), 3.0) \
        in samples
