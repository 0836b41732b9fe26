"""Agent component "l7": the running L7 parsers (each started by the capability lifecycle)
and the proxy ports they serve right now.

The endpoint component asks `proxy_ports` when it writes policy maps: a redirect to a port
no healthy proxy serves loads as deny (fail closed). Which parser handles a redirect is the
rule's protocol (`rules.http` -> the parser whose `protocol` is "http"); when no running
parser has that name, plugins may claim it through `pylium_l7_parser_for_port`."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from pylium.api.records import Capability
from pylium.policy.mapstate import PROTOCOL_NAMES
from pylium.policy.resolve import PROXY_PORTS

log = logging.getLogger(__name__)


def proxy_ports_of(protocol: str) -> dict[str, int]:
    """The ports the datapath redirects `protocol` to: {"ingress": p, "egress": q}."""
    return {direction.name.lower(): port for (kind, direction), port in PROXY_PORTS.items()
            if kind == protocol}


#: how often the served proxy ports are compared with what the policy maps were built for
SERVED_PORTS_CHECK_S = 1.0


class L7Proxies:
    """`daemon.components["l7"]`. Watches the ports the parsers' proxies serve: when a proxy
    comes up or dies, every endpoint is regenerated, so redirects to it load as redirects or
    turn back into denies (fail closed) within about a second."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.parsers: list[Any] = []  # RunningCapability of kind "l7"
        self.last_served: set[int] = set()
        self._watch: Any = None

    def add(self, running: Any) -> None:
        """A parser whose backend just started (the lifecycle marks it running right after):
        its ports count as served already, as they will for the endpoints' regeneration
        that follows. Counting them only a second later made every agent start regenerate
        every endpoint twice (and warn that the ports changed)."""
        self.parsers.append(running)
        try:
            started = set(running.backend.served_ports())
        except Exception as exc:  # a broken plugin serves nothing: fail closed
            log.warning("l7 parser %s: served_ports failed: %s", running.name, exc)
            started = set()
        self.last_served = self.proxy_ports | started
        if self._watch is None:
            self._watch = self.daemon.spawn(self._watch_served_ports())

    def remove(self, running: Any) -> None:
        if running in self.parsers:
            self.parsers.remove(running)

    async def _watch_served_ports(self) -> None:
        while True:
            await asyncio.sleep(SERVED_PORTS_CHECK_S)
            try:
                await self.check_served_ports()
            except Exception:
                log.exception("checking the L7 proxies' ports failed")

    async def check_served_ports(self) -> bool:
        """Regenerate the endpoints if the served ports changed; True if they did."""
        served = self.proxy_ports
        if served == self.last_served:
            return False
        gone, came = sorted(self.last_served - served), sorted(served - self.last_served)
        self.last_served = served
        log.warning("L7 proxy ports changed (now serving %s; gone %s, new %s): "
                    "regenerating endpoints", sorted(served) or "none", gone or "-", came or "-")
        endpoints = self.daemon.components.get("endpoint")
        if endpoints is not None:
            await endpoints.regenerate_all("L7 proxy ports changed")
        return True

    @property
    def proxy_ports(self) -> set[int]:
        """Ports served by healthy proxies now (never those of a failed parser)."""
        ports: set[int] = set()
        for running in self.parsers:
            if running.state != "running":
                continue
            try:
                ports |= set(running.backend.served_ports())
            except Exception as exc:  # a broken plugin serves nothing: fail closed
                log.warning("l7 parser %s: served_ports failed: %s", running.name, exc)
        return ports

    def parser_name_for(self, protocol: str, port: int, transport: str = "TCP") -> str | None:
        """Which running parser judges `protocol` requests redirected from `port`: the one
        whose `protocol` it is, else the one a plugin names through
        `pylium_l7_parser_for_port` (None: nobody; the redirect stays fail-closed)."""
        running = [r for r in self.parsers if r.state == "running"]
        for r in running:
            if (getattr(r.backend, "protocol", "") or r.name) == protocol:
                return r.name
        claimed = self.daemon.plugins.hook.pylium_l7_parser_for_port(port=port,
                                                                     protocol=transport)
        return claimed if any(r.name == claimed for r in running) else None


class IdentityLookup:
    """`pylium.api.context.IdentityLookup` over the agent's identity cache and ipcache."""

    def __init__(self, daemon):
        self.daemon = daemon

    def labels_of(self, identity: int) -> tuple[str, ...]:
        from pylium.identity.model import RESERVED_IDENTITIES

        found = RESERVED_IDENTITIES.get(identity)
        component = self.daemon.components.get("identity")
        if found is None and component is not None:
            found = component.lookup(identity)
        return tuple(found.labels.sorted_strings()) if found is not None else ()

    def identity_of_ip(self, address: str) -> int:
        ip = str(ipaddress.IPv4Address(address))
        endpoints = self.daemon.components.get("endpoint")
        if endpoints is not None:
            for ep in endpoints.list():
                if ep.ipv4 == ip and ep.identity:
                    return int(ep.identity)
        datapath = self.daemon.components.get("datapath")
        if datapath is not None:
            found = datapath.lookup_ipcache(ip)
            if found is not None:
                return found
        component = self.daemon.components.get("identity")
        if component is not None:
            return int(component.cache.for_ip(ip).id)
        return 2  # reserved:world


class L7PolicySource:
    """What one L7 parser judges requests against: for every local endpoint, the L7 grants
    of each redirected policy key (from the policy engine) whose protocol this parser
    handles (`L7Proxies.parser_for`), and a way to hear of changes."""

    def __init__(self, daemon, parser: str):
        self.daemon = daemon
        self.parser = parser

    def _handled_here(self, key: Any, grants: tuple) -> bool:
        proxies = self.daemon.components.get("l7")
        if proxies is None:
            return False
        kinds = {g.kind for g in grants if g.kind}
        transport = PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
        return any(proxies.parser_name_for(kind, key.port, transport) == self.parser
                   for kind in kinds)

    def snapshot(self) -> list[dict[str, Any]]:
        """[{ep_id, ipv4, identity, entries: [(PolicyKey, (L7Grant, ...)), ...]}]"""
        endpoints = self.daemon.components.get("endpoint")
        policy = self.daemon.components.get("policy")
        if endpoints is None or policy is None:
            return []
        out = []
        for ep in endpoints.list():
            if not ep.identity:
                continue
            try:
                computed = policy.engine.endpoint_policy(ep.identity)
            except Exception as exc:
                log.warning("L7 policy of endpoint %s not computed: %s", ep.id, exc)
                continue
            entries = [(key, grants) for key, grants in computed.l7.items()
                       if self._handled_here(key, grants)]
            out.append({"ep_id": ep.id, "ipv4": ep.ipv4, "identity": int(ep.identity),
                        "entries": sorted(entries, key=lambda kv: str(kv[0]))})
        return out

    def subscribe(self, callback) -> Any:
        """`callback()` after every policy or identity change; returns an unsubscribe."""
        policy = self.daemon.components.get("policy")
        if policy is None:
            return lambda: None
        return policy.engine.subscribe(lambda _change: callback())


class LazyFlowRecorder:
    """The flow layer starts after the L7 parsers; proxies record through this."""

    def __init__(self, daemon):
        self.daemon = daemon

    def record_l7(self, **fields: Any) -> Any:
        flows = self.daemon.components.get("flow")
        if flows is None:
            return None
        return flows.record_l7(**fields)

    def record_l7_many(self, records: list[dict[str, Any]]) -> int:
        """A proxy batch at once (`FlowObserver.record_l7_many`); without a flow layer
        nothing is recorded (as `record_l7`)."""
        flows = self.daemon.components.get("flow")
        if flows is None:
            return 0
        return flows.record_l7_many(records)

    @property
    def l7_generation(self) -> Any:
        """`FlowObserver.l7_generation` (None without a flow layer: nothing is recorded)."""
        flows = self.daemon.components.get("flow")
        return None if flows is None else flows.l7_generation

    def l7_head(self, base: dict[str, Any], verdict: str = "FORWARDED") -> tuple:
        flows = self.daemon.components.get("flow")
        return () if flows is None else flows.l7_head(base, verdict)

    def record_l7_raw(self, heads: list[tuple], members: list[bytes],
                      prefixes: list[bytes] | None = None) -> None:
        """A proxy's records as it sent them (`FlowObserver.record_l7_raw`)."""
        flows = self.daemon.components.get("flow")
        if flows is not None:
            flows.record_l7_raw(heads, members, prefixes)


def l7_context_handles(daemon, record: Capability) -> dict[str, Any]:
    """The L7Context fields beyond the common ones."""
    protocol = getattr(record.backend, "protocol", "") or record.name
    return {"datapath": daemon.components.get("datapath"),
            "proxy_ports": proxy_ports_of(protocol),
            "policy": L7PolicySource(daemon, record.name),
            "identities": IdentityLookup(daemon),
            "flows": LazyFlowRecorder(daemon)}

