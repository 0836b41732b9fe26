"""The `kafka` L7 parser backend: pylium's L7 proxy process with the Kafka parser
(`pylium_l7_kafka.parser`), fed the Kafka policy of local endpoints; its records become
flows and Hubble's Kafka metrics.

The proxy process outlives the agent, as for `http`; `python -m pylium.l7.proxy stop
--state-dir DIR` (DIR = `status()["state_dir"]`) stops it for good."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pylium.api import L7Request, L7Verdict
from pylium.l7.backend import ProxiedParser, RegistryMetrics
from pylium.l7.parser import Grant

from pylium_l7_kafka.rules import API_KEY_NAMES, API_KEY_NUMBERS, Request, judge

REPORTER = {0: "server", 1: "client"}  # flow direction: ingress = the broker's side


class KafkaMetrics(RegistryMetrics):
    """Hubble's Kafka metric families, once per registry (the proxy metrics are the
    core's: `pylium.l7.backend.ProxyMetrics`)."""

    def __init__(self, registry: Any):
        from prometheus_client import Counter, Histogram

        kw = {"registry": registry}
        self.requests = Counter("hubble_kafka_requests",
                                "Kafka requests by topic, api key, error code and reporter",
                                ["topic", "api_key", "error_code", "reporter"], **kw)
        self.duration = Histogram("hubble_kafka_request_duration_seconds",
                                  "Kafka request latency (response received)",
                                  ["topic", "api_key", "reporter"], **kw)

    def observe(self, flow: dict[str, Any]) -> None:
        """Counted on responses (the broker's or the proxy's denial), as Hubble does."""
        l7 = flow.get("l7", {})
        kafka = l7.get("kafka", {})
        if l7.get("type") != "RESPONSE" or "api_key" not in kafka:
            return
        reporter = REPORTER.get(flow.get("direction"), "client")
        api_key = API_KEY_NAMES.get(kafka["api_key"], str(kafka["api_key"]))
        for topic in kafka.get("topics") or [kafka.get("topic", "")]:
            self.requests.labels(topic, api_key, str(kafka.get("error_code", 0)),
                                 reporter).inc()
            if l7.get("latency_ns"):
                self.duration.labels(topic, api_key, reporter).observe(l7["latency_ns"] / 1e9)


class L7Kafka(ProxiedParser):
    """`l7 parser` capability "kafka"."""

    name = "kafka"
    protocol = "kafka"
    parser_spec = "pylium_l7_kafka.parser:KafkaParserFactory"

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.metrics = KafkaMetrics.of(getattr(context, "metrics", None))

    def version(self) -> str:
        try:
            return version("pylium-l7-kafka")
        except PackageNotFoundError:
            return "0"

    def observe(self, flow: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.observe(flow)

    def judge(self, rules: list[Any], request: L7Request) -> L7Verdict:
        """The proxy's own decision for one request (`pylium policy trace`): fields
        `api_key` (name or number), `api_version`, `client_id`, `topics` (or `topic`)."""
        grants = tuple(Grant(rule=getattr(r, "rule", ""), allow_all=r.allow_all,
                             rules=tuple(r.rules or ())) if hasattr(r, "allow_all")
                       else Grant(rule="", rules=(r,)) for r in rules
)
        f = request.fields
        key = f.get("api_key", 0)
        key = API_KEY_NUMBERS[str(key).lower()] if not str(key).isdigit() else int(key)
        topics = f.get("topics")
        if topics is None:
            topics = (f["topic"],) if f.get("topic") else ()
        verdict = judge(grants, Request(key, int(f.get("api_version", 0)),
                                        f.get("client_id"), tuple(topics)))
        if verdict.allowed:
            return L7Verdict(True, f"allowed by {verdict.rule}")
        denied = ", ".join(verdict.denied_topics)
        return L7Verdict(False, "no Kafka rule matches (TOPIC_AUTHORIZATION_FAILED"
                         + (f" for {denied})" if denied else ")"))
