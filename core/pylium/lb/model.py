"""Services and backends as users state them (Cilium's service model: a frontend
VIP:port/protocol, backends, a type, a traffic policy) and their JSON form in the KV store
and the API. Bad input raises `UserError` naming the field."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs

from pylium.errors import UserError
from pylium.lb.maglev import MaglevTable, backend_name

PROTOCOLS = {"TCP": 6, "UDP": 17}
#: ExternalIPs and LoadBalancer frontends are served like a ClusterIP (a VIP balanced to the
#: backends); the type says where the address came from, as `cilium service list` does
TYPES = ("ClusterIP", "NodePort", "ExternalIPs", "LoadBalancer")
TRAFFIC_POLICIES = ("Cluster", "Local")
ALGORITHMS = ("random", "maglev")
BACKEND_STATES = ("active", "terminating", "quarantined", "maintenance")
MAX_AFFINITY_SECONDS = 86400  # Kubernetes' sessionAffinityConfig.clientIP.timeoutSeconds max
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9./]{0,251}[a-z0-9])?$")
_ADDR_RE = re.compile(r"^(?P<ip>[0-9.]+):(?P<port>[0-9]+)(/(?P<proto>[A-Za-z]+))?$")


def _parse_addr(text: str, what: str) -> tuple[str, int, str | None]:
    m = _ADDR_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UserError(f"{what}: {text!r} is not IPv4:PORT[/TCP|UDP]")
    try:
        ip = str(ipaddress.IPv4Address(m["ip"]))
    except ValueError:
        raise UserError(f"{what}: {m['ip']!r} is not an IPv4 address") from None
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise UserError(f"{what}: port {port} outside 1..65535")
    proto = m["proto"].upper() if m["proto"] else None
    if proto is not None and proto not in PROTOCOLS:
        raise UserError(f"{what}: protocol {m['proto']!r} is not TCP or UDP")
    return ip, port, proto


@attrs.frozen
class Frontend:
    ip: str
    port: int
    protocol: str = "TCP"

    @classmethod
    def parse(cls, text: str) -> Frontend:
        ip, port, proto = _parse_addr(text, "frontend")
        return cls(ip, port, proto or "TCP")

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@attrs.frozen
class Backend:
    ip: str
    port: int
    state: str = "active"

    @classmethod
    def parse(cls, value: Any) -> Backend:
        """"IP:PORT", or {"address": "IP:PORT", "state": ...}."""
        state = "active"
        if isinstance(value, dict):
            unknown = set(value) - {"address", "state"}
            if unknown:
                raise UserError(f"backend: unknown field(s) {', '.join(sorted(unknown))}")
            state = value.get("state", "active")
            value = value.get("address")
        ip, port, proto = _parse_addr(value, "backend")
        if proto is not None:
            raise UserError(f"backend {value!r}: give IP:PORT (the protocol is the frontend's)")
        if state not in BACKEND_STATES:
            raise UserError(f"backend {value}: state {state!r} is not one of "
                            f"{', '.join(BACKEND_STATES)}")
        return cls(ip, port, state)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@attrs.frozen
class Service:
    """One service. `id` is cluster-wide (allocated in the KV store) and is the rev-NAT
    index in every node's datapath."""

    name: str
    frontend: Frontend
    backends: tuple[Backend, ...] = ()
    type: str = "ClusterIP"
    algorithm: str = "random"
    affinity_timeout: int = 0
    traffic_policy: str = "Cluster"
    id: int = 0
    #: NodePort services: the port on every node's address
    node_port: int = 0
    #: a maglev service's lookup table as its writer evolved it (minimal-disruption
    #: mode); stored with the service, not part of its API form (`to_json`)
    maglev: MaglevTable | None = None

    def active_names(self) -> list[str]:
        """The names of the backends new flows may pick (their Maglev names)."""
        return [backend_name(b.ip, b.port, self.frontend.protocol) for b in self.backends
                if b.state == "active"]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "frontend": str(self.frontend),
                "backends": [{"address": b.address, "state": b.state} for b in self.backends],
                "type": self.type, "algorithm": self.algorithm,
                "affinity_timeout": self.affinity_timeout,
                "traffic_policy": self.traffic_policy, "node_port": self.node_port}

    @classmethod
    def from_json(cls, name: str, body: dict[str, Any], id: int = 0) -> Service:
        """Validate an API body / stored value; every mistake is one `UserError` line."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(f"service name {name!r}: lower-case letters, digits, '-', '.' "
                            "or '/' (e.g. default/deathstar)")
        known = {"name", "id", "frontend", "backends", "type", "algorithm",
                 "affinity_timeout", "traffic_policy", "node_port"}
        unknown = set(body) - known
        if unknown:
            raise UserError(f"service {name}: unknown field(s) {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(known - {'name', 'id'}))})")
        if "frontend" not in body:
            raise UserError(f"service {name}: frontend is required (VIP:PORT[/TCP|UDP])")
        frontend = Frontend.parse(body["frontend"])
        raw_backends = body.get("backends", [])
        if not isinstance(raw_backends, list):
            raise UserError(f"service {name}: backends must be a list")
        backends = tuple(Backend.parse(b) for b in raw_backends)
        addresses = [b.address for b in backends]
        if len(set(addresses)) != len(addresses):
            raise UserError(f"service {name}: a backend is listed twice")
        svc_type = body.get("type", "ClusterIP")
        if svc_type not in TYPES:
            raise UserError(f"service {name}: type {svc_type!r} is not one of {', '.join(TYPES)}")
        algorithm = body.get("algorithm", "random")
        if algorithm not in ALGORITHMS:
            raise UserError(f"service {name}: algorithm {algorithm!r} is not one of "
                            f"{', '.join(ALGORITHMS)}")
        affinity = body.get("affinity_timeout", 0)
        if isinstance(affinity, bool) or not isinstance(affinity, int) or not (
                0 <= affinity <= MAX_AFFINITY_SECONDS):
            raise UserError(f"service {name}: affinity_timeout must be 0..{MAX_AFFINITY_SECONDS}"
                            f" seconds, got {affinity!r}")
        policy = body.get("traffic_policy", "Cluster")
        if policy not in TRAFFIC_POLICIES:
            raise UserError(f"service {name}: traffic_policy {policy!r} is not one of "
                            f"{', '.join(TRAFFIC_POLICIES)}")
        node_port = body.get("node_port", 0)
        if isinstance(node_port, bool) or not isinstance(node_port, int) or not (
                0 <= node_port <= 65535):
            raise UserError(f"service {name}: node_port must be 1..65535, got {node_port!r}")
        if svc_type == "NodePort" and not node_port:
            raise UserError(f"service {name}: a NodePort service needs node_port "
                            "(Kubernetes uses 30000-32767)")
        if svc_type != "NodePort" and node_port:
            raise UserError(f"service {name}: node_port is for type NodePort only")
        return cls(name, frontend, backends, svc_type, algorithm, affinity, policy,
                   int(body.get("id", id) or id), node_port)
