"""Kafka policy matching: which `PortRuleKafka` (role, apiKey, apiVersion, clientID, topic)
allows which request, with Cilium's semantics and the role table pylium documents.

A request is allowed when every topic it names is allowed by some rule that also matches
its api key, version and client id; a request that names no topic (ApiVersions,
FindCoordinator, JoinGroup, ...) is allowed by any such rule, whether or not the rule names
a topic (otherwise `role: consume, topic: X` could never join a group). A request whose
topics cannot be known (an api key pylium does not parse, a Metadata request for *all*
topics, a topic named only by id) is allowed only by rules without a topic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from pylium.policy.kafka import API_KEYS, ROLES, PortRuleKafka

#: Cilium's apiKey names -> Kafka api key numbers
API_KEY_NUMBERS = {
    "produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "leaderandisr": 4,
    "stopreplica": 5, "updatemetadata": 6, "controlledshutdown": 7, "offsetcommit": 8,
    "offsetfetch": 9, "findcoordinator": 10, "joingroup": 11, "heartbeat": 12,
    "leavegroup": 13, "syncgroup": 14, "describegroups": 15, "listgroups": 16,
    "saslhandshake": 17, "apiversions": 18, "createtopics": 19, "deletetopics": 20,
    "deleterecords": 21, "initproducerid": 22, "offsetforleaderepoch": 23,
    "addpartitionstotxn": 24, "addoffsetstotxn": 25, "endtxn": 26, "writetxnmarkers": 27,
    "txnoffsetcommit": 28, "describeacls": 29, "createacls": 30, "deleteacls": 31,
    "describeconfigs": 32, "alterconfigs": 33,
}
API_KEY_NAMES = {number: name for name, number in API_KEY_NUMBERS.items()}
assert set(API_KEY_NUMBERS) == set(API_KEYS)

#: role -> api keys. Cilium's table plus InitProducerId (22) for produce (idempotent
#: producers, the default of the Java client since Kafka 3.0, send it before any
#: Produce) and OffsetForLeaderEpoch (23) for consume (KIP-320: consumers validate their
#: position after a leader change; librdkafka and the Java client send it).
ROLE_API_KEYS = {
    "produce": frozenset({0, 3, 18, 22}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23}),
}
assert set(ROLE_API_KEYS) == set(ROLES)


@attrs.frozen
class Request:
    """What policy looks at in one request."""

    api_key: int
    api_version: int
    client_id: str | None
    #: the topics named, None = cannot be known (only topic-less rules apply); () = none
    topics: tuple[str, ...] | None = ()


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


def rule_covers(rule: PortRuleKafka, api_key: int, api_version: int,
                client_id: str | None) -> bool:
    """Everything but the topic."""
    if rule.role and api_key not in ROLE_API_KEYS[rule.role.lower()]:
        return False
    if rule.api_key and API_KEY_NUMBERS[rule.api_key.lower()] != api_key:
        return False
    if rule.api_version and int(rule.api_version) != api_version:
        return False
    return not (rule.client_id and rule.client_id != (client_id or ""))


def topic_allowed(rules: Iterable[PortRuleKafka], request: Request, topic: str) -> bool:
    return any(rule_covers(r, request.api_key, request.api_version, request.client_id)
               and (not r.topic or r.topic == topic) for r in rules)


@attrs.frozen
class Verdict:
    allowed: bool
    rule: str = ""
    #: topics no rule allows (all of them when the request is denied as a whole)
    denied_topics: tuple[str, ...] = ()


def judge(grants: Iterable[Any] | None, request: Request) -> Verdict:
    """`grants`: the `pylium.l7.parser.Grant`s of the connection's key (None = no key
    covers it: nothing is allowed)."""
    grants = tuple(grants or ())
    for grant in grants:
        if grant.allow_all:
            return Verdict(True, grant.rule)
    if request.topics is None:
        for grant in grants:
            if any(not r.topic and rule_covers(r, request.api_key, request.api_version,
                                               request.client_id) for r in grant.rules):
                return Verdict(True, grant.rule)
        return Verdict(False)
    if not request.topics:
        for grant in grants:
            if any(rule_covers(r, request.api_key, request.api_version, request.client_id)
                   for r in grant.rules):
                return Verdict(True, grant.rule)
        return Verdict(False)
    denied = []
    names = set()
    for topic in dict.fromkeys(request.topics):
        by = next((g.rule for g in grants if topic_allowed(g.rules, request, topic)), None)
        if by is None:
            denied.append(topic)
        else:
            names.add(by)
    if denied:
        return Verdict(False, denied_topics=tuple(denied))
    return Verdict(True, ",".join(sorted(names)))
