"""The answers the proxy gives in the broker's place: a denied request gets a response of
its own api key, version and correlation id, with TOPIC_AUTHORIZATION_FAILED (29) for each
topic and partition it named (as a broker with ACLs answers), so clients report an
authorization error and keep the connection."""

from __future__ import annotations

from typing import Any

from pylium_l7_kafka import codec

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53

#: api key -> (response topics array, its topic-name field, its partitions array or None,
#: partition index field, request topics array, request topic-name field, request
#: partitions array (structs, or a list of ints), request partition index field or None)
MIRRORS: dict[int, tuple[str, str, str | None, str, str, str, str | None, str | None]] = {
    0: ("Responses", "Name", "PartitionResponses", "Index",
        "TopicData", "Name", "PartitionData", "Index"),
    1: ("Responses", "Topic", "Partitions", "PartitionIndex",
        "Topics", "Topic", "Partitions", "Partition"),
    2: ("Topics", "Name", "Partitions", "PartitionIndex",
        "Topics", "Name", "Partitions", "PartitionIndex"),
    3: ("Topics", "Name", None, "", "Topics", "Name", None, None),
    8: ("Topics", "Name", "Partitions", "PartitionIndex",
        "Topics", "Name", "Partitions", "PartitionIndex"),
    9: ("Topics", "Name", "Partitions", "PartitionIndex",
        "Topics", "Name", "PartitionIndexes", None),
    19: ("Topics", "Name", None, "", "Topics", "Name", None, None),
    21: ("Topics", "Name", "Partitions", "PartitionIndex",
         "Topics", "Name", "Partitions", "PartitionIndex"),
    23: ("Topics", "Topic", "Partitions", "Partition",
         "Topics", "Topic", "Partitions", "Partition"),
    24: ("ResultsByTopicV3AndBelow", "Name", "ResultsByPartition", "PartitionIndex",
         "V3AndBelowTopics", "Name", "Partitions", None),
    28: ("Topics", "Name", "Partitions", "PartitionIndex",
         "Topics", "Name", "Partitions", "PartitionIndex"),
    37: ("Results", "Name", None, "", "Topics", "Name", None, None),
    47: ("Topics", "Name", "Partitions", "PartitionIndex",
         "Topics", "Name", "Partitions", "PartitionIndex"),
    61: ("Topics", "Name", "Partitions", "PartitionIndex",
         "Topics", "Name", "PartitionIndexes", None),
}
GROUP_KEYS = frozenset({10, 11, 12, 13, 14, 15, 16, 42})
ERROR_FIELDS = ("ErrorCode", "PartitionErrorCode")


def _errors(code: int) -> dict[str, int]:
    return dict.fromkeys(ERROR_FIELDS, code)


def _topics(value: dict[str, Any], spec: tuple, code: int) -> list[dict[str, Any]]:
    r_topics, r_name, r_parts, r_index, q_topics, q_name, q_parts, q_index = spec
    out = []
    for topic in value.get(q_topics) or ():
        item: dict[str, Any] = {r_name: topic.get(q_name), **_errors(code)}
        if "TopicId" in topic:
            item["TopicId"] = topic["TopicId"]
        if r_parts is not None:
            parts = topic.get(q_parts) or ()
            item[r_parts] = [{r_index: p if q_index is None else p.get(q_index),
                              **_errors(code)} for p in parts]
        out.append(item)
    return out


def non_topic_code(api_key: int, request: dict[str, Any]) -> int:
    if api_key == 22:
        return TRANSACTIONAL_ID_AUTHORIZATION_FAILED if request.get("TransactionalId") \
            else CLUSTER_AUTHORIZATION_FAILED
    if api_key in (25, 26):
        return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if api_key == 10 and request.get("KeyType") == 1:
        return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if api_key in GROUP_KEYS:
        return GROUP_AUTHORIZATION_FAILED
    return CLUSTER_AUTHORIZATION_FAILED


def denial_value(api_key: int, version: int, request: dict[str, Any]) -> tuple[dict, int]:
    """(response value, the error code it carries) for a denied request."""
    spec = MIRRORS.get(api_key)
    if api_key == 20:  # DeleteTopics: names, or (v6) structs with names and ids
        names = request.get("TopicNames") or [t.get("Name") for t in request.get("Topics") or ()]
        ids = [t.get("TopicId") for t in request.get("Topics") or ()] or [None] * len(names)
        answers = [{"Name": n, "ErrorCode": TOPIC_AUTHORIZATION_FAILED,
                      **({"TopicId": i} if i is not None else {})} for n, i in zip(names, ids, strict=False)]
        return {"Responses": answers}, TOPIC_AUTHORIZATION_FAILED
    if api_key == 9 and version >= 8:  # OffsetFetch for several groups
        groups = []
        for group in request.get("Groups") or ():
            groups.append({"GroupId": group.get("GroupId"), "ErrorCode": 0,
                           "Topics": _topics(group, spec, TOPIC_AUTHORIZATION_FAILED)})
        return {"Groups": groups}, TOPIC_AUTHORIZATION_FAILED
    if api_key == 24 and version >= 4:  # broker-to-broker form: one code for all
        return {"ErrorCode": TOPIC_AUTHORIZATION_FAILED}, TOPIC_AUTHORIZATION_FAILED
    if spec is not None:
        value: dict[str, Any] = {spec[0]: _topics(request, spec, TOPIC_AUTHORIZATION_FAILED)}
        if api_key == 9 and request.get("Topics") is None:  # "all topics" of a group
            value["ErrorCode"] = TOPIC_AUTHORIZATION_FAILED
        return value, TOPIC_AUTHORIZATION_FAILED
    code = non_topic_code(api_key, request)
    value = {"ErrorCode": code}
    if api_key == 10 and request.get("CoordinatorKeys"):
        value["Coordinators"] = [{"Key": k, "ErrorCode": code, "NodeId": -1, "Port": -1}
                                 for k in request["CoordinatorKeys"]]
    if api_key == 10:
        value.update(NodeId=-1, Port=-1)
    return value, code


def can_answer(api_key: int, version: int) -> bool:
    found = codec.message(api_key, "response")
    return found is not None and found[1][0] <= version <= found[1][1]


def denial(api_key: int, version: int, correlation_id: int,
           request: dict[str, Any]) -> tuple[bytes, int]:
    """(the whole response frame, its error code)."""
    value, code = denial_value(api_key, version, request)
    body = codec.encode(api_key, "response", version, value)
    return codec.response_frame(api_key, version, correlation_id, body), code


def first_error(value: Any) -> int:
    """The first non-zero error code anywhere in a decoded response (0 if none)."""
    if isinstance(value, dict):
        for key, v in value.items():
            if key in ERROR_FIELDS and v:
                return int(v)
        for v in value.values():
            if isinstance(v, (dict, list)):
                found = first_error(v)
                if found:
                    return found
    elif isinstance(value, list):
        for v in value:
            found = first_error(v)
            if found:
                return found
    return 0
