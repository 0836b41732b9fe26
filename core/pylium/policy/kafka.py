"""Kafka rules (`toPorts[].rules.kafka`), as Cilium's `api.PortRuleKafka`."""

from __future__ import annotations

import attrs

#: Kafka API keys Cilium knows by name
API_KEYS = frozenset({
    "produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica",
    "updatemetadata", "controlledshutdown", "offsetcommit", "offsetfetch",
    "findcoordinator", "joingroup", "heartbeat", "leavegroup", "syncgroup",
    "describegroups", "listgroups", "saslhandshake", "apiversions", "createtopics",
    "deletetopics", "deleterecords", "initproducerid", "offsetforleaderepoch",
    "addpartitionstotxn", "addoffsetstotxn", "endtxn", "writetxnmarkers",
    "txnoffsetcommit", "describeacls", "createacls", "deleteacls", "describeconfigs",
    "alterconfigs",
})
ROLES = frozenset({"produce", "consume"})


@attrs.frozen
class PortRuleKafka:
    role: str = ""
    api_key: str = ""
    api_version: str = ""
    client_id: str = ""
    topic: str = ""
