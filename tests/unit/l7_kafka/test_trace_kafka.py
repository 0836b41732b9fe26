"""`pylium policy trace --kafka-*` against Cilium's Kafka example: the reference evaluator
and the proxy share `pylium.policy.kafka`, so trace answers what the proxy does."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pylium.errors import UserError
from pylium.policy.load import load_files
from pylium.policy.trace import TraceQuery, trace

EXAMPLE = Path(__file__).resolve().parents[3] / "plugins/l7_kafka/examples/kafka-empire.yaml"


def verdict(src: str, api_key: str, topic: str = "", version: int = 0) -> str:
    query = TraceQuery(src=f"app={src}", dst="app=kafka", dport=9092, kafka_api_key=api_key,
                       kafka_topic=topic, kafka_api_version=version)
    return trace(query, load_files([EXAMPLE])).to_dict()["verdict"]


@pytest.mark.parametrize("src, api_key, topic, expected", [
    ("empire-hq", "produce", "deathstar-plans", "redirected"),
    ("empire-hq", "produce", "empire-announce,deathstar-plans", "redirected"),
    ("empire-hq", "fetch", "deathstar-plans", "denied"),
    ("empire-hq", "initproducerid", "", "redirected"),
    ("empire-outpost", "fetch", "empire-announce", "redirected"),
    ("empire-outpost", "joingroup", "", "redirected"),
    ("empire-outpost", "fetch", "deathstar-plans", "denied"),
    ("empire-outpost", "fetch", "empire-announce,deathstar-plans", "denied"),
    ("empire-outpost", "produce", "empire-announce", "denied"),
    ("empire-backup", "offsetforleaderepoch", "deathstar-plans", "redirected"),
    ("empire-backup", "offsetcommit", "empire-announce", "denied"),
])
def test_trace_kafka_example(src, api_key, topic, expected):
    assert verdict(src, api_key, topic) == expected


def test_trace_refuses_bad_kafka_queries():
    with pytest.raises(UserError, match="not a Kafka API key"):
        TraceQuery(src="app=a", dst="app=b", dport=9092, kafka_api_key="publish")
    with pytest.raises(UserError, match="HTTP .* or Kafka"):
        TraceQuery(src="app=a", dst="app=b", dport=9092, kafka_api_key="produce",
                   http_method="GET", http_path="/")
    with pytest.raises(UserError, match="required"):
        TraceQuery(src="app=a", dst="app=b", dport=9092, kafka_topic="t")


def test_cli_trace_kafka_offline():
    from pylium.cli.main import cli

    result = CliRunner().invoke(cli, [
        "policy", "trace", "--src", "app=empire-outpost", "--dst", "app=kafka", "--dport",
        "9092", "--kafka-api-key", "produce", "--kafka-topic", "empire-announce",
        "--policy-file", str(EXAMPLE), "-o", "json"])
    assert result.exit_code == 0, result.output
    assert '"verdict": "denied"' in result.output
