"""Kubernetes Services + EndpointSlices → pylium's load balancer (what kube-proxy, or
Cilium's kube-proxy replacement, reads).

One pylium service per Service port: frontend `clusterIP:port/protocol`; backends the ready
IPv4 endpoints of the Service's EndpointSlices (label `kubernetes.io/service-name`) for the
slice port of the same name and protocol (the slice carries the resolved target port).
NodePort and LoadBalancer Services also get their node port; `externalTrafficPolicy: Local`
becomes traffic policy Local, `sessionAffinity: ClientIP` the affinity timeout. Headless and
ExternalName Services have no frontend and are left out, as are SCTP ports and non-IPv4
addresses. A Service with no ready endpoint keeps its frontend with no backend: the
datapath refuses connections to it instead of letting them go anywhere.

External addresses: every IPv4 `spec.externalIPs` entry and `status.loadBalancer.ingress[].ip`
is one more frontend per port with the same backends (kube-proxy and Cilium serve those
too), a pylium service of its own since a pylium service has one frontend. It carries the
affinity; `externalTrafficPolicy: Local` stays with the node port, where pylium's datapath
applies it (an external frontend balances over every backend). An address that is also the
ClusterIP, or both an externalIP and an ingress IP, is one frontend.

Names: `namespace/name` for a Service with one port, `namespace/name.<port name>` when it
has several (a Service name holds no dot, so the two never clash); an external frontend
appends `.external.<IP>` (spec.externalIPs) or `.lb.<IP>` (load-balancer ingress), e.g.
`shop/web.http.external.10.1.2.3` — one or two dot-free parts before the kind, so no name
of one form is a name of another.

`ServiceSync` writes through the agent's service API (`context.services`: `upsert`,
`delete`) — the same path as `PUT/DELETE /v1/service` — and remembers which services it
wrote in its state directory, so after an agent restart it deletes those whose Kubernetes
Service went away meanwhile, and never touches services added by hand."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP")
#: Kubernetes' default for sessionAffinityConfig.clientIP.timeoutSeconds
DEFAULT_AFFINITY_S = 10800


def _ipv4(text: Any) -> str | None:
    try:
        return str(ipaddress.IPv4Address(str(text)))
    except ValueError:
        return None


def slice_backends(port_name: str, protocol: str,
                   slices: Iterable[dict[str, Any]]) -> list[str]:
    """`IP:PORT` of every ready IPv4 endpoint of `slices` for the port named `port_name`."""
    out: set[str] = set()
    for sl in slices:
        if sl.get("addressType") != "IPv4":
            continue
        ports = [p.get("port") for p in sl.get("ports") or []
                 if (p.get("name") or "") == port_name
                 and (p.get("protocol") or "TCP") == protocol and p.get("port")]
        if not ports:
            continue
        for endpoint in sl.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # nil means ready (both discovery versions say so); a terminating endpoint
            # takes no new connections
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                ip = _ipv4(address)
                if ip is not None:
                    out.update(f"{ip}:{int(port)}" for port in ports)
    return sorted(out, key=lambda a: (ipaddress.IPv4Address(a.split(":")[0]),
                                      int(a.split(":")[1])))


def external_ips(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, IPv4) of the Service's extra frontend addresses, kind `external` for
    spec.externalIPs and `lb` for status.loadBalancer.ingress[].ip, without duplicates or
    the ClusterIP (a hostname-only ingress or an IPv6 address has no IPv4 frontend)."""
    spec = service.get("spec") or {}
    seen = {_ipv4(spec.get("clusterIP"))}
    out = []
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    for kind, addresses in (("external", spec.get("externalIPs") or []),
                            ("lb", [i.get("ip") for i in ingress if isinstance(i, dict)])):
        for text in addresses:
            ip = _ipv4(text)
            if ip is not None and ip not in seen:
                seen.add(ip)
                out.append((kind, ip))
    return out


def translate(service: dict[str, Any],
              slices: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """pylium service name → the body `PUT /v1/service/<name>` takes, for one Kubernetes
    Service and its EndpointSlices ({} for a Service without a load-balanced frontend)."""
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    kind = spec.get("type") or "ClusterIP"
    cluster_ip = _ipv4(spec.get("clusterIP"))
    if kind == "ExternalName" or cluster_ip is None:
        return {}
    ports = [p for p in spec.get("ports") or [] if (p.get("protocol") or "TCP") in PROTOCOLS
             and p.get("port")]
    slices = list(slices)
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
                       .get("timeoutSeconds") or DEFAULT_AFFINITY_S)
    out = {}
    for port in ports:
        protocol = port.get("protocol") or "TCP"
        port_name = port.get("name") or ""
        key = f"{namespace}/{name}"
        if len(ports) > 1:
            key += f".{port_name or port['port']}"
        node_port = int(port.get("nodePort") or 0) if kind in ("NodePort",
                                                               "LoadBalancer") else 0
        body: dict[str, Any] = {
            "frontend": f"{cluster_ip}:{int(port['port'])}/{protocol}",
            "backends": slice_backends(port_name, protocol, slices),
            "type": "NodePort" if node_port else "ClusterIP",
            "affinity_timeout": min(affinity, 86400),
            "traffic_policy": "Local" if node_port and
            spec.get("externalTrafficPolicy") == "Local" else "Cluster",
        }
        if node_port:
            body["node_port"] = node_port
        out[key] = body
        for kind, ip in external_ips(service):
            out[f"{key}.{kind}.{ip}"] = {
                "frontend": f"{ip}:{int(port['port'])}/{protocol}",
                "backends": body["backends"], "type": FRONTEND_TYPES[kind],
                "affinity_timeout": body["affinity_timeout"], "traffic_policy": "Cluster"}
    return out


#: the pylium service type of each kind of extra frontend (Cilium's names)
FRONTEND_TYPES = {"external": "ExternalIPs", "lb": "LoadBalancer"}


def owner_of(name: str) -> tuple[str, str]:
    """(namespace, Service name) of a pylium service name `translate` made."""
    namespace, _, rest = name.partition("/")
    return namespace, rest.split(".", 1)[0]


class ServiceSync:
    """Keeps the load balancer's services equal to what the Services and EndpointSlices
    say. `services`: the agent's service API; `state_dir`: where the names written are
    remembered (None: in memory only)."""

    STATE_FILE = "services.json"

    def __init__(self, services: Any, state_dir: Path | None = None):
        from pylium.lb.model import Service

        self._service_type = Service
        self.services = services
        self.path = Path(state_dir) / self.STATE_FILE if state_dir is not None else None
        #: pylium service name → the body last written
        self.written: dict[str, dict[str, Any]] = self._load()
        self.errors: dict[str, str] = {}
        #: services the agent refused (e.g. a frontend clash): retried on every change
        self.failed: dict[str, dict[str, Any]] = {}
        self.stats = {"upserts": 0, "deletes": 0}
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(k): dict(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s unreadable (%s): services written before are not tracked",
                        self.path, exc)
            return {}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.written, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    async def sync(self, namespace: str, name: str, service: dict[str, Any] | None,
                   slices: Iterable[dict[str, Any]]) -> None:
        """Bring the pylium services of Service namespace/name (None: deleted) in line."""
        desired = translate(service, slices) if service is not None else {}
        async with self._lock:
            mine = {k for k in [*self.written, *self.failed] if owner_of(k) == (namespace, name)}
            await self._apply(desired, mine)

    async def resync(self, desired: dict[str, dict[str, Any]]) -> None:
        """The whole set at once (after the first lists): also deletes services this
        plugin wrote whose Service is gone."""
        async with self._lock:
            await self._apply(desired, set(self.written) | set(self.failed))

    async def _apply(self, desired: dict[str, dict[str, Any]], mine: set[str]) -> None:
        for key in sorted(mine - set(desired)):
            self.failed.pop(key, None)
            if key not in self.written:
                continue
            try:
                await self.services.delete(key)
            except Exception as exc:
                self.errors[key] = f"delete failed: {exc}"
                log.error("service %s not deleted: %s", key, exc)
                continue
            self.written.pop(key, None)
            self.errors.pop(key, None)
            self.stats["deletes"] += 1
            log.info("service %s deleted", key)
        for key, body in desired.items():
            if self.written.get(key) != body or key in self.failed:
                await self._upsert(key, body)
        # a change may have freed what another service clashed with (its frontend)
        for key, body in list(self.failed.items()):
            if key not in desired:
                await self._upsert(key, body)
        self._save()

    async def _upsert(self, key: str, body: dict[str, Any]) -> None:
        try:
            svc = self._service_type.from_json(key, body)
            stored = await self.services.upsert(svc)
        except Exception as exc:  # a clash with a service added by hand, bad data
            if self.failed.get(key) != body:
                log.error("service %s not applied: %s", key, exc)
            self.errors[key] = str(exc)
            self.failed[key] = body
            return
        self.errors.pop(key, None)
        self.failed.pop(key, None)
        self.written[key] = body
        self.stats["upserts"] += 1
        log.info("service %s (id %d) %s -> %d backend(s)", key, stored.id, body["frontend"],
                 len(body["backends"]))

    def status(self) -> dict[str, Any]:
        return {"services": len(self.written), **self.stats, "errors": dict(self.errors)}
