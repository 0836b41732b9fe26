"""Kafka policy inside the proxy: the rules the agent pushed, judged per request with the
semantics of `pylium.policy.kafka` (role table, topics, the rest)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from pylium.policy.kafka import (
    API_KEY_NAMES,
    API_KEY_NUMBERS,
    ROLE_API_KEYS,
    ROLES,
    KafkaRequest,
    PortRuleKafka,
    allows,
    topic_allowed,
)

__all__ = ["API_KEY_NAMES", "API_KEY_NUMBERS", "ROLE_API_KEYS", "Request", "Verdict",
           "judge", "rule_from_json"]

Request = KafkaRequest


def rule_from_json(data: Mapping[str, Any]) -> PortRuleKafka:
    """A `PortRuleKafka` from the agent's JSON (attrs field names); ValueError when it
    cannot be enforced as written."""
    known = {"role", "api_key", "api_version", "client_id", "topic"}
    extra = set(data) - known
    if extra:
        raise ValueError(f"unknown Kafka rule field(s) {sorted(extra)}")
    rule = PortRuleKafka(**{k: str(v or "") for k, v in data.items()})
    if rule.role and rule.role.lower() not in ROLES:
        raise ValueError(f"role {rule.role!r} is not produce or consume")
    if rule.api_key and rule.api_key.lower() not in API_KEY_NUMBERS:
        raise ValueError(f"apiKey {rule.api_key!r} is not a Kafka API key")
    if rule.api_version and not rule.api_version.isdigit():
        raise ValueError(f"apiVersion {rule.api_version!r} is not a number")
    return rule


@attrs.frozen
class Verdict:
    allowed: bool
    rule: str = ""
    #: topics no rule allows
    denied_topics: tuple[str, ...] = ()


def judge(grants: Iterable[Any] | None, request: KafkaRequest) -> Verdict:
    """`grants`: the `pylium.l7.parser.Grant`s of the connection's key (None = no key
    covers it: nothing is allowed). Topics may be allowed by rules of different grants."""
    grants = tuple(grants or ())
    for grant in grants:
        if grant.allow_all:
            return Verdict(True, grant.rule)
    if request.topics is None or not request.topics:
        for grant in grants:
            if allows(grant.rules, request):
                return Verdict(True, grant.rule)
        return Verdict(False)
    denied, names = [], set()
    for topic in dict.fromkeys(request.topics):
        by = next((g.rule for g in grants if topic_allowed(g.rules, request, topic)), None)
        if by is None:
            denied.append(topic)
        else:
            names.add(by)
    if denied:
        return Verdict(False, denied_topics=tuple(denied))
    return Verdict(True, ",".join(sorted(names)))
