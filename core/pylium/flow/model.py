"""Flow records and their Hubble-compatible JSON (field names from Hubble's `flow.proto`,
rendered the way `hubble observe -o json` prints them: proto field names, enum names).

A `Flow` is a compact tuple decoded from one datapath event; the JSON dict is built only
when someone asks (`to_hubble`), so the decoder stays cheap and the ring holds small
objects. `LostEvent` records sit in the same ring, in order, like Hubble's."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import attrs
import orjson

from pylium.datapath.maps.metrics import REASONS

# struct pylium_event.type (bpf/lib/events.h)
EVENT_DROP = 1
EVENT_TRACE = 2
EVENT_POLICY_VERDICT = 3
#: an L7 record reported by a proxy (not a datapath event; Cilium's access-log message type)
EVENT_L7 = 129

#: Cilium monitor message types (pkg/monitor/api/types.go), Hubble's `event_type.type`
CILIUM_MESSAGE_TYPE = {EVENT_DROP: 1, EVENT_TRACE: 4, EVENT_POLICY_VERDICT: 5,
                       EVENT_L7: 129}

# POLICY_VERDICT reason codes
PV_ALLOW, PV_DENY, PV_REDIRECT, PV_AUDIT = 1, 2, 3, 4
#: trace point of a new service flow's translation (bpf/lib/events.h TRACE_LB_XLATE)
TRACE_LB_XLATE = 14

DROP_POLICY_DENIED = 133

#: Cilium drop reason codes → Hubble `DropReason` enum names (flow.proto)
DROP_REASON_NAMES: dict[int, str] = {
    130: "INVALID_SOURCE_MAC", 131: "INVALID_DESTINATION_MAC", 132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED", 134: "INVALID_PACKET_DROPPED", 135: "CT_TRUNCATED_OR_INVALID_HEADER",
    136: "CT_MISSING_TCP_ACK_FLAG", 137: "CT_UNKNOWN_L4_PROTOCOL",
    138: "CT_CANNOT_CREATE_ENTRY_FROM_PACKET", 139: "UNSUPPORTED_L3_PROTOCOL",
    140: "MISSED_TAIL_CALL", 141: "ERROR_WRITING_TO_PACKET", 142: "UNKNOWN_L4_PROTOCOL",
    143: "UNKNOWN_ICMPV4_CODE", 144: "UNKNOWN_ICMPV4_TYPE", 145: "UNKNOWN_ICMPV6_CODE",
    146: "UNKNOWN_ICMPV6_TYPE", 147: "ERROR_RETRIEVING_TUNNEL_KEY",
    148: "ERROR_RETRIEVING_TUNNEL_OPTIONS", 149: "INVALID_GENEVE_OPTION",
    150: "UNKNOWN_L3_TARGET_ADDRESS", 151: "STALE_OR_UNROUTABLE_IP",
    152: "NO_MATCHING_LOCAL_CONTAINER_FOUND", 153: "ERROR_WHILE_CORRECTING_L3_CHECKSUM",
    154: "ERROR_WHILE_CORRECTING_L4_CHECKSUM", 155: "CT_MAP_INSERTION_FAILED",
    156: "INVALID_IPV6_EXTENSION_HEADER", 157: "IP_FRAGMENTATION_NOT_SUPPORTED",
    158: "SERVICE_BACKEND_NOT_FOUND", 160: "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT",
    161: "FAILED_TO_INSERT_INTO_PROXYMAP", 162: "REACHED_EDT_RATE_LIMITING_DROP_HORIZON",
    163: "UNKNOWN_CONNECTION_TRACKING_STATE", 164: "LOCAL_HOST_IS_UNREACHABLE",
    165: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
    166: "UNSUPPORTED_L2_PROTOCOL", 167: "NO_MAPPING_FOR_NAT_MASQUERADE",
    168: "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE", 169: "FIB_LOOKUP_FAILED",
    170: "ENCAPSULATION_TRAFFIC_IS_PROHIBITED", 171: "INVALID_IDENTITY", 172: "UNKNOWN_SENDER",
    173: "NAT_NOT_NEEDED", 174: "IS_A_CLUSTERIP",
    175: "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", 176: "FORBIDDEN_ICMPV6_MESSAGE",
    177: "DENIED_BY_LB_SRC_RANGE_CHECK", 178: "SOCKET_LOOKUP_FAILED",
    179: "SOCKET_ASSIGN_FAILED", 180: "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL",
    181: "POLICY_DENY", 182: "VLAN_FILTERED", 183: "INVALID_VNI", 184: "INVALID_TC_BUFFER",
    185: "NO_SID", 186: "MISSING_SRV6_STATE", 187: "NAT46", 188: "NAT64",
    189: "AUTH_REQUIRED", 190: "CT_NO_MAP_FOUND", 191: "SNAT_NO_MAP_FOUND",
    192: "INVALID_CLUSTER_ID", 193: "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP",
    194: "NO_EGRESS_GATEWAY", 196: "TTL_EXCEEDED", 197: "NO_NODE_ID",
    202: "DROP_HOST_NOT_READY", 203: "DROP_EP_NOT_READY",
    220: "UNENCRYPTED_TRAFFIC",  # pylium's own code (bpf/lib/common.h DROP_UNENCRYPTED)
}

#: human text per drop reason: the datapath's table (one place for Cilium's wording)
DROP_REASON_TEXT = REASONS

#: Cilium trace observation point codes → Hubble `TraceObservationPoint` names
TRACE_POINT_NAMES: dict[int, str] = {
    0: "TO_ENDPOINT", 1: "TO_PROXY", 2: "TO_HOST", 3: "TO_STACK", 4: "TO_OVERLAY",
    5: "FROM_ENDPOINT", 6: "FROM_PROXY", 7: "FROM_HOST", 8: "FROM_STACK", 9: "FROM_OVERLAY",
    10: "FROM_NETWORK", 11: "TO_NETWORK", 12: "TO_CRYPTO", 13: "FROM_CRYPTO",
    14: "FROM_ENDPOINT",  # TRACE_LB_XLATE: a service flow translated where it left the pod
}

PROTO_TCP, PROTO_UDP, PROTO_ICMP = 6, 17, 1
TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08),
                 ("ACK", 0x10), ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
DIRECTIONS = ("INGRESS", "EGRESS")
VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR", "TRACED", "TRANSLATED")

# lost-event sources (Hubble's LostEventSource names) and our metric labels for them
LOST_KERNEL = "PERF_EVENT_RING_BUFFER"    # BPF ring buffer full: bpf_ringbuf_reserve failed
LOST_AGENT = "OBSERVER_EVENTS_QUEUE"      # the agent could not take a record (malformed)
LOST_FOLLOWER = "HUBBLE_RING_BUFFER"      # a reader fell behind the agent's flow ring
LOST_METRIC_SOURCE = {LOST_KERNEL: "datapath_ring_buffer", LOST_AGENT: "agent_decoder",
                      LOST_FOLLOWER: "flow_ring_reader"}


@attrs.frozen
class Peer:
    """One side of a flow, Hubble's `Endpoint` message. Shared between flows (cached)."""

    ID: int = 0
    identity: int = 0
    namespace: str = ""
    labels: tuple[str, ...] = ()
    pod_name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ID:
            out["ID"] = self.ID
        if self.identity:
            out["identity"] = self.identity
        if self.namespace:
            out["namespace"] = self.namespace
        if self.labels:
            out["labels"] = list(self.labels)
        if self.pod_name:
            out["pod_name"] = self.pod_name
        return out

    def display(self) -> str:
        if self.pod_name:
            return f"{self.namespace}/{self.pod_name}" if self.namespace else self.pod_name
        return ""


NO_PEER = Peer()


@attrs.frozen
class ServiceRef:
    """The service a translated flow went through: Hubble's `Service` message (name,
    namespace) plus the frontend the client addressed (VIP:PORT/PROTO), which Hubble does
    not carry; pylium shows it so a flow to a backend still says which VIP it was for."""

    name: str
    namespace: str = ""
    frontend: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        return out

    def display(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class Flow(NamedTuple):
    """One decoded datapath event. `time_ns` is wall-clock (UNIX epoch) nanoseconds."""

    time_ns: int
    node_name: str
    kind: int            # EVENT_DROP | EVENT_TRACE | EVENT_POLICY_VERDICT
    reason: int          # drop reason / trace point / policy verdict code, as sent
    verdict: str         # Hubble verdict name
    drop_reason: int     # Cilium drop code when DROPPED, else 0
    direction: int       # 0 ingress, 1 egress (relative to ep_id)
    is_reply: bool
    ep_id: int
    proxy_port: int
    src_identity: int
    dst_identity: int
    src_ip: str
    dst_ip: str
    sport: int           # host order; ICMP: type
    dport: int           # host order; ICMP: code
    protocol: int
    tcp_flags: int
    ifindex: int
    pkt_len: int
    source: Peer
    destination: Peer
    l7: dict | None = None   # {"type": ..., "http": {...}} once L7 events land
    encrypted: bool = False  # the packet left the node encrypted (Hubble IP.encrypted)
    service: ServiceRef | None = None  # service flow: the service its rev-NAT index names


class L7Flow(Flow):
    """An L7 flow whose `l7` stays as a proxy sent it until someone reads it: the members
    of its record's JSON object (`"verdict":...,"l7":{...}`, without braces). Taking a
    proxy's record then costs no decoding, and the ring holds one bytes object per flow
    instead of a tree of dicts (which the collector walks and every overwrite frees).
    Reading `l7` decodes it each time (hold on to the value to use it twice); a record
    that does not decode reads as `{}`."""

    __slots__ = ()

    @property
    def l7(self) -> dict | None:  # type: ignore[override]
        try:
            return orjson.loads(b"{%b}" % tuple.__getitem__(self, L7_INDEX))["l7"]
        except (ValueError, KeyError, TypeError):
            return {}


#: where `Flow.l7` lies in the tuple (`L7Flow` keeps its raw record there)
L7_INDEX = Flow._fields.index("l7")
#: an `L7Flow`'s fields after its raw record (`encrypted`, `service`): a proxy's flows are
#: never encrypted on the wire it saw, and name no service
_L7_TAIL = (False, None)


def l7_flow(time_ns: int, head: tuple, raw: bytes) -> L7Flow:
    """The `L7Flow` of a proxy's record `raw` at `time_ns`; `head` is what the flows of its
    connection side share: `Flow`'s fields after `time_ns` and before `l7`."""
    return tuple.__new__(L7Flow, (time_ns, *head, raw, *_L7_TAIL))


class LostEvent(NamedTuple):
    """Hubble's `LostEvent`: `num_events_lost` events were lost at `source`."""

    time_ns: int
    node_name: str
    source: str
    num_events_lost: int
    cpu: int | None = None


def rfc3339(time_ns: int) -> str:
    secs, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{nanos:09d}Z"


def compact_time(time_ns: int) -> str:
    secs, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%b %d %H:%M:%S", time.gmtime(secs)) + f".{nanos // 1_000_000:03d}"


def tcp_flag_names(flags: int) -> list[str]:
    return [name for name, bit in TCP_FLAG_BITS if flags & bit]


def l4_json(flow: Flow) -> dict[str, Any]:
    if flow.protocol == PROTO_TCP:
        return {"TCP": {"source_port": flow.sport, "destination_port": flow.dport,
                        "flags": {n: True for n in tcp_flag_names(flow.tcp_flags)}}}
    if flow.protocol == PROTO_UDP:
        return {"UDP": {"source_port": flow.sport, "destination_port": flow.dport}}
    if flow.protocol == PROTO_ICMP:
        return {"ICMPv4": {"type": flow.sport, "code": flow.dport}}
    return {}


ICMP_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 8: "EchoRequest", 11: "TimeExceeded"}


def is_non_ipv4(flow: Flow) -> bool:
    """The datapath reports packets it did not parse as IPv4 (e.g. IPv6, dropped as an
    unsupported L3 protocol) with zero addresses and protocol."""
    return flow.protocol == 0 and flow.src_ip == "0.0.0.0" and flow.dst_ip == "0.0.0.0"


def summary(flow: Flow, l7: dict | None = None) -> str:
    """`l7`: the flow's, if the caller read it already (an `L7Flow` decodes it per read)."""
    if is_non_ipv4(flow):
        return "non-IPv4 packet"
    if l7 is None:
        l7 = flow.l7
    if l7 and l7.get("http"):
        http = l7["http"]
        return f"HTTP/1.1 {http.get('method', '')} {http.get('url', '')}".strip()
    if l7 and l7.get("kafka"):
        return kafka_summary(l7)
    if flow.protocol == PROTO_TCP:
        return "TCP Flags: " + ", ".join(tcp_flag_names(flow.tcp_flags))
    if flow.protocol == PROTO_UDP:
        return "UDP"
    if flow.protocol == PROTO_ICMP:
        return "ICMPv4 " + ICMP_TYPES.get(flow.sport, f"type {flow.sport}")
    return f"IP protocol {flow.protocol}"


def kafka_summary(l7: dict[str, Any]) -> str:
    """Hubble's wording: `Kafka request produce correlation id 8 topic 'orders'`."""
    from pylium.policy.kafka import API_KEY_NAMES

    kafka = l7["kafka"]
    key = kafka.get("api_key")
    name = API_KEY_NAMES.get(key, str(key)) if key is not None else "?"
    text = f"Kafka {str(l7.get('type', 'request')).lower()} {name}"
    if "correlation_id" in kafka:
        text += f" correlation id {kafka['correlation_id']}"
    if kafka.get("topic"):
        text += f" topic '{kafka['topic']}'"
    if kafka.get("error_code"):
        text += f" error {kafka['error_code']}"
    return text


def to_hubble(flow: Flow) -> dict[str, Any]:
    """The flow as Hubble's `Flow` JSON (proto field names, enum names)."""
    out: dict[str, Any] = {
        "time": rfc3339(flow.time_ns),
        "verdict": flow.verdict,
    }
    if flow.verdict == "DROPPED":
        out["drop_reason"] = flow.drop_reason
    if not is_non_ipv4(flow):
        out["IP"] = {"source": flow.src_ip, "destination": flow.dst_ip, "ipVersion": "IPv4"}
        if flow.encrypted:
            out["IP"]["encrypted"] = True
    l4 = l4_json(flow)
    if l4:
        out["l4"] = l4
    src = flow.source.to_json()
    if flow.src_identity:
        src.setdefault("identity", flow.src_identity)
    dst = flow.destination.to_json()
    if flow.dst_identity:
        dst.setdefault("identity", flow.dst_identity)
    out["source"] = src
    out["destination"] = dst
    if flow.service is not None:
        # forward packets were DNATed to a backend; replies already carry the VIP again
        side = "source_service" if flow.is_reply else "destination_service"
        out[side] = flow.service.to_json()
        if flow.service.frontend:
            out["service_frontend"] = flow.service.frontend
    l7 = flow.l7
    out["Type"] = "L7" if l7 else "L3_L4"
    out["node_name"] = flow.node_name
    if l7:
        out["l7"] = l7
    out["event_type"] = {"type": CILIUM_MESSAGE_TYPE.get(flow.kind, 0)}
    if flow.kind == EVENT_DROP:
        out["event_type"]["sub_type"] = flow.reason
    out["traffic_direction"] = DIRECTIONS[flow.direction & 1]
    if flow.kind == EVENT_TRACE:
        out["trace_observation_point"] = TRACE_POINT_NAMES.get(flow.reason, "UNKNOWN_POINT")
    if flow.verdict == "DROPPED":
        out["drop_reason_desc"] = DROP_REASON_NAMES.get(flow.drop_reason, "DROP_REASON_UNKNOWN")
    out["is_reply"] = flow.is_reply
    if flow.proxy_port:
        out["proxy_port"] = flow.proxy_port
    if flow.ifindex:
        out["interface"] = {"index": flow.ifindex}
    out["Summary"] = summary(flow, l7)
    return out


def lost_to_hubble(event: LostEvent) -> dict[str, Any]:
    lost: dict[str, Any] = {"source": event.source, "num_events_lost": event.num_events_lost}
    if event.cpu is not None:
        lost["cpu"] = {"value": event.cpu}
    return lost


def to_response(record: Flow | LostEvent) -> dict[str, Any]:
    """One `GetFlowsResponse`-shaped line: {"flow": ...} or {"lost_events": ...}."""
    if isinstance(record, Flow):
        return {"flow": to_hubble(record), "node_name": record.node_name,
                "time": rfc3339(record.time_ns)}
    return {"lost_events": lost_to_hubble(record), "node_name": record.node_name,
            "time": rfc3339(record.time_ns)}


def endpoint_text(peer: dict, ip: str, port: int | None) -> str:
    name = ""
    if peer.get("pod_name"):
        ns = peer.get("namespace")
        name = f"{ns}/{peer['pod_name']}" if ns else peer["pod_name"]
    text = name or ip or "?"
    if port:
        text += f":{port}"
    ident = peer.get("identity")
    if ident:
        text += f" (ID:{ident})"
    return text


def compact_line(response: dict[str, Any]) -> str:
    """One line like `hubble observe` prints, from a response dict (so the CLI can render
    what the API sent without importing the agent side)."""
    if "node_status" in response:
        st = response["node_status"]
        names = ", ".join(st.get("node_names", []))
        return f"{st.get('state_change', 'NODE_STATUS')}: {names} {st.get('message', '')}".rstrip()
    if "lost_events" in response:
        lost = response["lost_events"]
        cpu = lost.get("cpu", {}).get("value") if lost.get("cpu") else None
        where = f" CPU({cpu})" if cpu is not None else ""
        return f"EVENTS LOST: {lost['source']}{where} {lost['num_events_lost']}"
    f = response["flow"]
    secs = parse_rfc3339(f["time"])
    l4 = f.get("l4", {})
    proto = next(iter(l4), "")
    ports = l4.get(proto, {}) if proto in ("TCP", "UDP") else {}
    ip = f.get("IP", {})
    src = endpoint_text(f.get("source", {}), ip.get("source", ""), ports.get("source_port"))
    dst = endpoint_text(f.get("destination", {}), ip.get("destination", ""),
                         ports.get("destination_port"))
    arrow = "<-" if f.get("is_reply") else "->"
    for side in ("destination_service", "source_service"):
        svc = f.get(side)
        if svc:
            name = f"{svc['namespace']}/{svc['name']}" if svc.get("namespace") else svc["name"]
            vip = f.get("service_frontend", "").rsplit("/", 1)[0]
            if side == "destination_service":  # the VIP the client addressed => the backend
                dst = f"{vip + ' ' if vip else ''}(service {name}) => {dst}"
            else:
                src = f"{src} (service {name})"
    verdict = f["verdict"]
    event = f.get("event_type", {}).get("type")
    if event == 129:
        l7 = f.get("l7", {})
        proto = "http" if "http" in l7 else "kafka" if "kafka" in l7 else "l7"
        what = f"{proto}-{str(l7.get('type', 'request')).lower()} {verdict}"
    elif event == 5:
        decision = {"FORWARDED": "ALLOWED", "DROPPED": "DENIED"}.get(verdict, verdict)
        match = "none" if verdict == "DROPPED" else "L3-L4"
        what = f"policy-verdict:{match} {f.get('traffic_direction', '')} {decision}"
    elif verdict == "DROPPED":
        text = DROP_REASON_TEXT.get(f.get("drop_reason", 0), f.get("drop_reason_desc", ""))
        what = f"{text} DROPPED"
    else:
        point = f.get("trace_observation_point", "")
        what = f"{point.lower().replace('_', '-')} {verdict}".strip()
    return f"{compact_time(secs)}: {src} {arrow} {dst} {what} ({f.get('Summary', '')})"


def parse_rfc3339(text: str) -> int:
    """RFC 3339 with nanoseconds (what `rfc3339` writes) back to epoch nanoseconds."""
    import calendar

    base, _, frac = text.rstrip("Z").partition(".")
    secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])
