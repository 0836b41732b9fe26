"""Kafka rules (`toPorts[].rules.kafka`), as Cilium's `api.PortRuleKafka`, and what they
allow: the role table and the matching both the L7 proxy (`pylium_l7_kafka`) and the
reference evaluator (`pylium policy trace --kafka-*`) use.

A request is allowed when every topic it names is allowed by some rule that also matches
its api key, version and client id; a request that names no topic (ApiVersions,
FindCoordinator, JoinGroup, ...) is allowed by any such rule, whether or not the rule names
a topic (otherwise `role: consume, topic: X` could never join a group). A request whose
topics cannot be known (`topics` None: an api key the proxy does not parse, a request for
*every* topic, topics named only by id) is allowed only by rules without a topic."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

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
#: Kafka API keys Cilium knows by name
API_KEYS = frozenset(API_KEY_NUMBERS)

#: role -> api keys. Cilium's table plus InitProducerId (22) for produce (idempotent
#: producers, the default of the Java client since Kafka 3.0 and of librdkafka with
#: enable.idempotence, send it before any Produce) and OffsetForLeaderEpoch (23) for
#: consume (KIP-320: consumers validate their position after a leader change).
ROLE_API_KEYS = {
    "produce": frozenset({0, 3, 18, 22}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23}),
}
ROLES = frozenset(ROLE_API_KEYS)


@attrs.frozen
class PortRuleKafka:
    role: str = ""
    api_key: str = ""
    api_version: str = ""
    client_id: str = ""
    topic: str = ""

    def covers(self, api_key: int, api_version: int, client_id: str | None) -> bool:
        """Everything but the topic."""
        if self.role and api_key not in ROLE_API_KEYS.get(self.role.lower(), ()):
            return False
        if self.api_key and API_KEY_NUMBERS.get(self.api_key.lower()) != api_key:
            return False
        if self.api_version and self.api_version != str(api_version):
            return False
        return not (self.client_id and self.client_id != (client_id or ""))


@attrs.frozen
class KafkaRequest:
    """What policy looks at in one Kafka request."""

    api_key: int
    api_version: int = 0
    client_id: str | None = None
    #: the topics named; () = none; None = cannot be known (only topic-less rules apply)
    topics: tuple[str, ...] | None = ()


def topic_allowed(rules: Iterable[PortRuleKafka], request: KafkaRequest, topic: str) -> bool:
    return any(r.covers(request.api_key, request.api_version, request.client_id)
               and (not r.topic or r.topic == topic) for r in rules)


def allows(rules: Iterable[PortRuleKafka], request: KafkaRequest) -> bool:
    """Do these rules (of one or several grants) allow the whole request?"""
    rules = tuple(rules)
    covering = [r for r in rules if r.covers(request.api_key, request.api_version,
                                             request.client_id)]
    if request.topics is None:
        return any(not r.topic for r in covering)
    if not request.topics:
        return bool(covering)
    return all(topic_allowed(covering, request, t) for t in request.topics)
