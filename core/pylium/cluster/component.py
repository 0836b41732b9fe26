"""Agent component "cluster": registers this node, follows the others, publishes local
endpoints and keeps remote ones in the BPF ipcache, and collects unused identities.

Options (`plugin_options: {cluster: {...}}` in the agent config):
  `lease_ttl`            seconds the node's lease lives without keepalive (default 15); a
                         node killed without cleanup disappears from the others (node
                         entry, endpoints, identity references) this long after its last
                         keepalive
  `identity_gc_interval` seconds between identity garbage collections (default 60); an
                         identity is deleted when no node referenced it in two runs in a
                         row
  `resync_interval`      seconds between checks of local endpoints against what is
                         published (default 5)

Node join/leave reaches the routing mode and encryption (if selected), then
`pylium_node_joined/left(node=...)` hook implementations (`daemon.capabilities`). The node
record carries the public key the encryption published."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import attrs

from pylium.api import NodeInfo
from pylium.api.kvstore import KVStoreUnavailable
from pylium.cluster.ipcache import DatapathSink, IPCacheSync, MemorySink
from pylium.cluster.nodes import NodeRegistry
from pylium.cluster.session import DEFAULT_LEASE_TTL, ClusterSession
from pylium.errors import ConfigError
from pylium.hookspecs import hookimpl

log = logging.getLogger(__name__)

OPTIONS = {"lease_ttl": DEFAULT_LEASE_TTL, "identity_gc_interval": 60.0,
           "resync_interval": 5.0}


def cluster_options(config) -> dict[str, float]:
    given = dict(config.plugin_options.get("cluster", {}) or {})
    unknown = set(given) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"plugin_options.cluster: unknown option(s) "
                          f"{', '.join(sorted(unknown))} (known: {', '.join(OPTIONS)})")
    out = {}
    for name, default in OPTIONS.items():
        value = given.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"plugin_options.cluster.{name}: must be a positive number, "
                              f"got {value!r}")
        out[name] = float(value)
    return out


def local_address() -> str:
    """The address this namespace would use towards the outside (no packet is sent: a UDP
    connect only picks a route), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route lookup matters
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class IdentityCollector:
    """Deletes identities nobody referenced in two consecutive runs (Cilium marks first
    and deletes on the next pass too), so a node between allocating and referencing, or
    renewing its lease, does not lose its number."""

    def __init__(self, allocator: Any):
        self.allocator = allocator
        self.marked: set[int] = set()
        self.collected = 0
        self.runs = 0

    async def run_once(self) -> list[int]:
        referenced = await self.allocator.all_references()
        unreferenced = {i.id for i in await self.allocator.list() if i.id not in referenced}
        due = self.marked & unreferenced
        deleted = await self.allocator.collect_garbage(only=due) if due else []
        self.marked = unreferenced - set(deleted)
        self.collected += len(deleted)
        self.runs += 1
        if deleted:
            log.info("identity gc: deleted unreferenced identities %s", deleted)
        return deleted


class _EndpointEvents:
    """Hook implementations: endpoint created/deleted → ipcache publication."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    @hookimpl
    def pylium_endpoint_created(self, endpoint: Any) -> None:
        self.cluster.ipcache.set_local(str(endpoint.ipv4), int(endpoint.identity),
                                       f"{endpoint.namespace}/{endpoint.name}")

    @hookimpl
    def pylium_endpoint_deleted(self, endpoint: Any) -> None:
        self.cluster.ipcache.remove_local(str(endpoint.ipv4))


class Cluster:
    def __init__(self, daemon, options: dict[str, float]):
        self.daemon = daemon
        self.options = options
        cfg = daemon.config
        encryption = daemon.components.get("encryption")
        self.local = NodeInfo(name=cfg.node_name, ipv4=cfg.node_ip or local_address(),
                              pod_cidr=cfg.pod_cidr,
                              encryption_key=str(encryption.setup_result or "")
                              if encryption is not None else "")
        self.session = ClusterSession(daemon.kvstore, ttl=options["lease_ttl"])
        self.nodes = NodeRegistry(daemon.kvstore, self.session, self.local,
                                  on_joined=self._joined, on_left=self._left,
                                  extra={"socket": str(cfg.socket),
                                         "routing_mode": cfg.routing_mode})
        datapath = daemon.components.get("datapath")
        self.sink = DatapathSink(datapath) if datapath is not None else MemorySink()
        self.ipcache = IPCacheSync(daemon.kvstore, self.session, self.local, self.sink,
                                   nodes=self.nodes)
        identities = daemon.components.get("identity")
        self.gc = IdentityCollector(identities.allocator) if identities is not None else None
        self._events = _EndpointEvents(self)
        self._tasks: list[asyncio.Task] = []
        if identities is not None and hasattr(identities, "retry_releases"):
            self.session.on_resync(self._retry_releases)
        if identities is not None and hasattr(identities, "resync"):
            self.session.on_resync(identities.resync)

    async def _adopt_identity_references(self, lease) -> None:
        """This node's identity references live under the node's cluster lease: one lease
        per node, so a dead node's references go with its node entry and endpoints."""
        manager = self.daemon.components["identity"]
        manager.lease_owner = "cluster"
        manager.allocator.lease = lease
        for identity in manager.referenced():
            restored = await manager.allocator.restore(identity)
            if restored.id != identity.id:
                log.error("identity %d of %s was lost and is now %d; endpoints keep the "
                          "old number until regenerated", identity.id, identity.labels,
                          restored.id)

    async def _retry_releases(self) -> None:
        released = await self.daemon.components["identity"].retry_releases()
        if released:
            log.info("released identity references an outage had kept: %s", released)

    # node events -----------------------------------------------------------------------------
    def _joined(self, node: NodeInfo) -> None:
        """Routing mode, encryption, then plugins' hooks (the capability lifecycle's order)."""
        self.daemon.capabilities.node_joined(node)

    def _left(self, node: NodeInfo) -> None:
        self.daemon.capabilities.node_left(node)

    async def set_encryption_key(self, key: str) -> None:
        """This node's encryption key changed (`pylium encrypt rotate`): republish the node
        record; every other node's encryption updates its peer on that event."""
        self.local = attrs.evolve(self.local, encryption_key=key)
        self.nodes.local = self.local
        self.ipcache.local = self.local
        await self.nodes.publish()

    # local endpoints -------------------------------------------------------------------------
    def _local_endpoints(self) -> dict[str, tuple[int, str]] | None:
        manager = self.daemon.components.get("endpoint")
        if manager is None:
            return None
        return {str(ep.ipv4): (int(ep.identity), f"{ep.namespace}/{ep.name}")
                for ep in manager.list() if ep.identity}

    async def _follow_endpoints(self) -> None:
        """Hooks say what changed at once; this catches what no hook reports (a label
        change that moved an endpoint to another identity, restored endpoints)."""
        while True:
            await asyncio.sleep(self.options["resync_interval"])
            local = self._local_endpoints()
            if local is not None:
                self.ipcache.replace_local(local)

    async def _collect_identities(self) -> None:
        while True:
            await asyncio.sleep(self.options["identity_gc_interval"])
            if not self.session.healthy:
                continue
            try:
                await self.daemon.components["identity"].retry_releases()
                await self.gc.run_once()
            except KVStoreUnavailable as exc:
                log.info("identity gc skipped: %s", exc)
            except Exception:
                log.exception("identity gc failed")

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.session.open()
        if self.gc is not None:
            await self._adopt_identity_references(self.session.lease)
            self.session.on_new_lease(self._adopt_identity_references)
        local = self._local_endpoints()
        if local:
            self.ipcache.replace_local(local)
        self.daemon.plugins.pm.register(self._events, name="pylium.cluster.endpoint-events")
        await self.nodes.start()
        await self.ipcache.start()
        self.session.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._follow_endpoints()))
        if self.gc is not None:
            self._tasks.append(loop.create_task(self._collect_identities()))
        log.info("cluster: node %s (%s, pod CIDR %s) registered; %d other node(s)",
                 self.local.name, self.local.ipv4, self.local.pod_cidr, len(self.nodes.nodes))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.daemon.plugins.pm.is_registered(self._events):
            self.daemon.plugins.pm.unregister(self._events)
        await self.ipcache.close()
        await self.nodes.close()
        # keys stay on the lease: a restarting agent takes them over, a dead one's expire
        await self.session.close()

    # views -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {**self.session.status(), "nodes": len(self.nodes.nodes) + 1,
                **self.ipcache.status(),
                "identity_gc_runs": self.gc.runs if self.gc else 0,
                "identities_collected": self.gc.collected if self.gc else 0}


async def start(daemon) -> Cluster | None:
    if daemon.kvstore is None:
        return None
    cluster = Cluster(daemon, cluster_options(daemon.config))
    await cluster.start()
    return cluster
