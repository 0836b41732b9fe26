"""Agent component "lb": follows the services in the KV store and writes them into this
node's LB maps (`pylium.datapath.lb.LbMaps`), so a service added through any node's API
works from pods on every node.

Options (`plugin_options: {lb: {...}}` in the agent config):
  `algorithm`           backend selection of services that do not name one: `random`
                        (default, as Cilium) or `maglev`
  `maglev_table_size`   entries in each Maglev lookup table this node writes: one of
                        Cilium's primes (default 16381); the seed is shared through the
                        KV store
  `maglev_mode`         how a maglev service's table changes with its backends:
                        `minimal-disruption` (default: the writer evolves the stored table,
                        removing one of N backends moves ~1/N of flows; `pylium.lb.maglev`
                        `evolve`) or `stateless` (Cilium's: every node recomputes the
                        table from the backends and the seed; up to ~2.3/N moves at N=100)
  `acceleration`        NodePort at XDP on the node's external interface: `disabled`
                        (default), `native` (falls back to generic where the driver
                        refuses) or `generic` (Cilium's --bpf-lb-acceleration)
  `socket_lb_cgroup`    a cgroup v2 directory holding the pods' processes: socket-level
                        LB (bpf_sock.c: connect/sendmsg/recvmsg/getpeername) is attached
                        there (default: none; never a host's root cgroup)

Backend ids are local to the node (the datapath's lb4_backends keys) and survive agent
restarts: they are read back from the pinned map at start, so conntrack entries of
established flows keep naming the right backend. Maglev tables too: a node installs the
table stored with the service (the same on every node); after a restart a pinned table
that already holds it is kept as it is, not rebuilt, and while the KV store is unreachable
the pinned maps go on serving unchanged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pylium.cluster.mirror import PrefixMirror
from pylium.errors import ConfigError
from pylium.hookspecs import hookimpl
from pylium.lb import maglev
from pylium.lb.model import ALGORITHMS, PROTOCOLS, Service
from pylium.lb.store import SVC_PREFIX, ServiceStore, decode

log = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {"algorithm": "random",
                           "maglev_table_size": maglev.DEFAULT_TABLE_SIZE,
                           "maglev_mode": maglev.DEFAULT_MODE,
                           "socket_lb_cgroup": "", "acceleration": "disabled"}
APPLY_WAIT_S = 10.0
#: how often a backend no service names any more is checked for flows still using it
DRAIN_CHECK_S = 2.0
#: a NodePort frontend's rev-NAT index: the service id plus this (ids stay below it)
NODEPORT_INDEX_OFFSET = 0x8000


def lb_options(config) -> dict[str, Any]:
    given = dict(config.plugin_options.get("lb", {}) or {})
    unknown = set(given) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"plugin_options.lb: unknown option(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(OPTIONS)})")
    out = {**OPTIONS, **given}
    if out["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"plugin_options.lb.algorithm: {out['algorithm']!r} is not one of "
                          f"{', '.join(ALGORITHMS)}")
    try:
        maglev.check_table_size(out["maglev_table_size"])
    except Exception as exc:
        raise ConfigError(f"plugin_options.lb.{exc}") from None
    if out["maglev_mode"] not in maglev.MODES:
        raise ConfigError(f"plugin_options.lb.maglev_mode: {out['maglev_mode']!r} is not one "
                          f"of {', '.join(maglev.MODES)}")
    if out["acceleration"] not in ("disabled", "native", "generic"):
        raise ConfigError(f"plugin_options.lb.acceleration: {out['acceleration']!r} is not "
                          "disabled, native or generic")
    if not isinstance(out["socket_lb_cgroup"], str):
        raise ConfigError("plugin_options.lb.socket_lb_cgroup: must be a path")
    return out


backend_name = maglev.backend_name  # its home is pylium.lb.maglev


class _EndpointEvents:
    """Local endpoints come and go: NodePort frontends carry only this node's backends."""

    def __init__(self, lb: LoadBalancer):
        self.lb = lb

    @hookimpl
    def pylium_endpoint_created(self, endpoint: Any) -> None:
        self.lb.refresh_nodeports()

    @hookimpl
    def pylium_endpoint_deleted(self, endpoint: Any) -> None:
        self.lb.refresh_nodeports()


class LoadBalancer:
    def __init__(self, daemon, options: dict[str, Any]):
        self.daemon = daemon
        self.options = options
        self.node_ip = daemon.config.node_ip or ""
        self.nodeport_device: str | None = None
        self.socket_lb = None
        self.xdp = None
        self.xdp_mode: str | None = None
        self._background: set[asyncio.Task] = set()
        self._events = _EndpointEvents(self)
        self.store = ServiceStore(daemon.kvstore,
                                  maglev_table_size=options["maglev_table_size"],
                                  maglev_mode=options["maglev_mode"])
        datapath = daemon.components.get("datapath")
        self.maps = None
        if datapath is not None:
            from pylium.datapath.lb import LbMaps

            self.maps = LbMaps(datapath.root)
            self.datapath = datapath
        self.seed = ""
        #: Maglev tables found pinned at start, by rev-NAT index: kept where they already
        #: hold the table to install (an agent restart rebuilds nothing)
        self._pinned_luts: dict[int, list[int]] = {}
        #: services as applied to this node's maps, by name
        self.applied: dict[str, Service] = {}
        #: (ip, port, proto number) -> backend id in lb4_backends
        self.backend_ids: dict[tuple[str, int, int], int] = {}
        self._last_backend_id = 0
        #: backends no service names any more, kept in lb4_backends as terminating while
        #: conntrack entries of their established flows name them (kube-proxy's conntrack
        #: keeps such flows too): (ip, port, proto number) -> backend id
        self.draining: dict[tuple[str, int, int], int] = {}
        self._drain_task: asyncio.Task | None = None
        self.events = {"add": 0, "update": 0, "delete": 0, "errors": 0}
        self.mirror = PrefixMirror(daemon.kvstore, SVC_PREFIX, self._changed,
                                   on_synced=self._synced)

    # lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.seed = await self.store.maglev_seed()
        if self.maps is not None:
            for backend_id, info in self.maps.dump_backends().items():
                self.backend_ids[(info["ip"], info["port"], info["proto"])] = backend_id
            # ids of backends removed before a restart may still be named by a flow's
            # conntrack entry or a client's affinity entry: new backends start above them,
            # so those find their backend gone (and pick again), never a stranger
            named = await asyncio.to_thread(self._ids_named_by_flows)
            self._last_backend_id = max(self.backend_ids.values(), default=0)
            self._last_backend_id = max(self._last_backend_id, *named, 0)
            self._pinned_luts = await asyncio.to_thread(self.maps.dump_maglev)
        if self.maps is not None:
            await asyncio.to_thread(self._attach_nodeport)  # netlink: off the event loop
            if self.options["socket_lb_cgroup"]:
                from pylium.datapath.sock import SocketLB

                self.socket_lb = SocketLB(self.datapath)
                # a cgroup that cannot take the programs is a config error: fail start-up
                self.socket_lb.attach(self.options["socket_lb_cgroup"])
        self.daemon.plugins.pm.register(self._events, name="pylium.lb.endpoint-events")
        cluster = self.daemon.components.get("cluster")
        if cluster is not None:
            # services live on no lease: after the store lost its data, write them back
            cluster.session.on_wipe(self.restore_to_store)
            cluster.session.on_wipe_noticed(self.mirror.store_wiped)
            cluster.session.on_resync(self.mirror.resync)
        self.mirror.start()
        try:
            async with asyncio.timeout(APPLY_WAIT_S):
                await self.mirror.synced.wait()
        except TimeoutError:
            log.warning("lb: services not listed within %.0fs; applying them when the KV "
                        "store answers", APPLY_WAIT_S)
        log.info("lb: %d service(s), selection %s, maglev table size %d", len(self.applied),
                 self.options["algorithm"], self.options["maglev_table_size"])

    def _attach_nodeport(self) -> None:
        from pylium.cluster.component import local_address
        from pylium.datapath.lb import attach_nodeport

        self.node_ip = self.node_ip or local_address()
        try:
            self.nodeport_device = attach_nodeport(self.datapath.prog_fds["from_netdev"],
                                                   self.node_ip)
        except Exception as exc:
            log.error("lb: NodePort not available: attaching from_netdev failed: %s", exc)
            return
        if self.nodeport_device is not None and self.options["acceleration"] != "disabled":
            from pylium.datapath import netns as plumbing
            from pylium.datapath.xdp import NodePortXDP

            self.xdp = NodePortXDP(self.datapath)
            # asked for and not possible: a config error, not a silent slow path
            self.xdp_mode = self.xdp.attach(plumbing.link_info(self.nodeport_device).ifindex,
                                            self.options["acceleration"])
        if self.nodeport_device is None:
            log.warning("lb: no interface holds node address %s: NodePort not available",
                        self.node_ip)

    async def restore_to_store(self) -> None:
        written = await self.store.restore(list(self.applied.values()), self.seed)
        if written:
            log.info("lb: wrote %d service(s) back to the kvstore", written)

    async def close(self) -> None:
        if self.daemon.plugins.pm.is_registered(self._events):
            self.daemon.plugins.pm.unregister(self._events)
        await self.mirror.close()
        if self.socket_lb is not None:
            self.socket_lb.close()  # stays attached, like the tc programs
        if self.xdp is not None:
            self.xdp.close()
        if self._drain_task is not None:
            self._drain_task.cancel()  # the next agent finds them terminating and drains them
            await asyncio.gather(self._drain_task, return_exceptions=True)
        if self.maps is not None:
            self.maps.close()  # the maps stay pinned: translation goes on without us

    # following the store ---------------------------------------------------------------
    def _changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        name = key[len(SVC_PREFIX):]
        try:
            if new is None:
                self._remove(name)
                self.events["delete"] += 1
            else:
                self._apply(decode(key, new))
                self.events["update" if old is not None else "add"] += 1
        except Exception:
            self.events["errors"] += 1
            raise

    def _synced(self) -> None:
        """After a (re)list: drop frontends the maps hold that no service names any more
        (deleted while this agent was down)."""
        if self.maps is None:
            return
        wanted = {(str(s.frontend), s.id) for s in self.applied.values()}
        wanted |= {(f"{self.node_ip}:{s.node_port}/{s.frontend.protocol}",
                    s.id + NODEPORT_INDEX_OFFSET) for s in self.applied.values() if s.node_port}
        for row in self.maps.dump():
            if (row["frontend"], row["id"]) not in wanted:
                ip, _, rest = row["frontend"].partition(":")
                port, _, proto = rest.partition("/")
                self.maps.delete_service(row["id"], ip, int(port), PROTOCOLS[proto])
                log.info("lb: removed stale frontend %s (id %d)", row["frontend"], row["id"])
        self._collect_backends()

    def _ids_named_by_flows(self) -> set[int]:
        return self.datapath.ct_backend_ids() | self.maps.affinity_backend_ids()

    def _backend_id(self, ip: str, port: int, proto: int) -> int:
        key = (ip, port, proto)
        if key not in self.backend_ids:
            if key in self.draining:  # back before its flows ended: the same id
                self.backend_ids[key] = self.draining.pop(key)
                return self.backend_ids[key]
            # never the id of a backend just removed: its flows' conntrack entries still
            # name it and must find it gone (and pick again), not find a stranger
            self._last_backend_id = max(self._last_backend_id, *self.backend_ids.values(),
                                        *self.draining.values(), 0) + 1
            self.backend_ids[key] = self._last_backend_id
        return self.backend_ids[key]

    def _apply(self, svc: Service) -> None:
        old = self.applied.get(svc.name)
        fe = svc.frontend
        proto = fe.proto_number
        if self.maps is not None:
            if old is not None and (old.frontend != fe or old.id != svc.id):
                self.maps.delete_service(old.id, old.frontend.ip, old.frontend.port,
                                         old.frontend.proto_number)
            # make before break: the active backends are written before the slots that
            # name them, a backend turning terminating only after the slots stopped naming
            # it (else a new flow picks it in between, finds it unusable and is refused)
            active = [b for b in svc.backends if b.state == "active"]
            self._upsert_backends(active, proto)
            ids = [self._backend_id(b.ip, b.port, proto) for b in active]
            algorithm = svc.algorithm or self.options["algorithm"]
            lut = None
            if algorithm == "maglev" and active:
                lut = self._maglev_lut(svc, active, ids)
            from pylium.datapath.maps.lb import ALGORITHMS as ALG_NUMBERS

            self.maps.upsert_service(svc.id, fe.ip, fe.port, proto, ids,
                                     algorithm=ALG_NUMBERS[algorithm], lut=lut,
                                     lut_installed=self._pinned_holds(svc.id, lut),
                                     affinity_timeout=svc.affinity_timeout,
                                     nodeport=svc.type == "NodePort",
                                     local=svc.traffic_policy == "Local")
            self._apply_nodeport(svc, old)
            self._upsert_backends([b for b in svc.backends if b.state != "active"], proto)
            if old is not None and self.socket_lb is not None and fe.protocol == "UDP":
                self._reset_udp_sockets(old, svc)
        self.applied[svc.name] = svc
        self._collect_backends()
        log.info("lb: service %s (id %d) %s -> %d backend(s)", svc.name, svc.id, fe,
                 len(svc.backends))

    def _upsert_backends(self, backends, proto: int) -> None:
        for b in backends:
            self.maps.upsert_backend(self._backend_id(b.ip, b.port, proto), b.ip, b.port,
                                     proto, b.state)

    def _local_ips(self) -> set[str]:
        manager = self.daemon.components.get("endpoint")
        return {str(ep.ipv4) for ep in manager.list()} if manager is not None else set()

    def _apply_nodeport(self, svc: Service, old: Service | None) -> None:
        """The node's own frontend (node address, node_port). Local: only this node's
        backends, the client's address kept. Cluster: every backend; one on another node
        is reached with the source NATed to this node's address (the datapath's
        nodeport_snat_forward), a local one keeps the client's address."""
        if old is not None and old.node_port and (old.node_port != svc.node_port
                                                  or old.frontend.protocol
                                                  != svc.frontend.protocol):
            self.maps.delete_service(old.id + NODEPORT_INDEX_OFFSET, self.node_ip,
                                     old.node_port, old.frontend.proto_number)
        if not svc.node_port or not self.node_ip:
            return
        fe = svc.frontend
        local = self._local_ips()
        active = [b for b in svc.backends if b.state == "active"
                  and (svc.traffic_policy == "Cluster" or b.ip in local)]
        ids = [self._backend_id(b.ip, b.port, fe.proto_number) for b in active]
        algorithm = svc.algorithm or self.options["algorithm"]
        lut = self._maglev_lut(svc, active, ids) if algorithm == "maglev" and active else None
        from pylium.datapath.maps.lb import ALGORITHMS as ALG_NUMBERS

        index = svc.id + NODEPORT_INDEX_OFFSET
        self.maps.upsert_service(index, self.node_ip, svc.node_port,
                                 fe.proto_number, ids, algorithm=ALG_NUMBERS[algorithm],
                                 lut=lut, lut_installed=self._pinned_holds(index, lut),
                                 affinity_timeout=svc.affinity_timeout,
                                 nodeport=True, local=svc.traffic_policy == "Local")

    def refresh_nodeports(self) -> None:
        if self.maps is None:
            return
        for svc in list(self.applied.values()):
            if svc.node_port:
                try:
                    self._apply_nodeport(svc, svc)
                except Exception:
                    log.exception("lb: refreshing NodePort of %s failed", svc.name)

    def _table(self, svc: Service, active) -> maglev.MaglevTable:
        """The table for `active` (a subset of the service's backends): the stored one; for
        a subset of it (a Local NodePort's local backends) the stored one with the others
        removed, minimally; without a stored one the stateless table. Each a function of
        the stored record and the seed, so every node with the same backends installs the
        same table."""
        names = [backend_name(b.ip, b.port, svc.frontend.protocol) for b in active]
        stored = svc.maglev
        if stored is not None and set(stored.backends) == set(names):
            return stored
        if stored is not None:
            return maglev.evolve(stored, names, stored.size, self.seed)
        return maglev.populate(names, self.options["maglev_table_size"], self.seed)

    def _maglev_lut(self, svc: Service, active, ids: list[int]) -> list[int]:
        """The table as datapath backend ids (`ids[i]` is `active[i]`'s)."""
        table = self._table(svc, active)
        id_of = {backend_name(b.ip, b.port, svc.frontend.protocol): backend_id
                 for b, backend_id in zip(active, ids, strict=True)}
        by_index = [id_of[name] for name in table.backends]
        return [by_index[i] for i in table.slots]

    def _pinned_holds(self, index: int, lut: list[int] | None) -> bool:
        """True once per frontend if the table pinned before this start is `lut`."""
        pinned = self._pinned_luts.pop(index, None)
        return lut is not None and pinned == lut

    def maglev_table(self, svc: Service) -> list[str]:
        """The service's Maglev table as backend addresses, as every node installs it."""
        active = [b for b in svc.backends if b.state == "active"]
        return [name.rpartition("/")[0] for name in self._table(svc, active).names()]

    def _reset_udp_sockets(self, old: Service, new: Service) -> None:
        """Backends that left selection: pods' connected UDP sockets to them are destroyed
        so their owners reconnect (socket LB picks again)."""
        still = {b.address for b in new.backends if b.state == "active"}
        gone = [b for b in old.backends if b.state == "active" and b.address not in still]
        manager = self.daemon.components.get("endpoint")
        if not gone or manager is None:
            return
        netns = [ep.netns for ep in manager.list() if ep.netns]

        def destroy() -> None:
            from pylium.datapath.sock import destroy_udp_sockets

            for ns in netns:
                for b in gone:
                    try:
                        n = destroy_udp_sockets(ns, b.ip, b.port)
                    except Exception as exc:
                        log.warning("lb: %s", exc)
                        continue
                    if n:
                        log.info("lb: %d UDP socket(s) to %s reset in %s", n, b.address, ns)

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(destroy))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remove(self, name: str) -> None:
        old = self.applied.pop(name, None)
        if old is None:
            return
        if self.maps is not None:
            self.maps.delete_service(old.id, old.frontend.ip, old.frontend.port,
                                     old.frontend.proto_number)
            if old.node_port and self.node_ip:
                self.maps.delete_service(old.id + NODEPORT_INDEX_OFFSET, self.node_ip,
                                         old.node_port, old.frontend.proto_number)
        self._collect_backends()
        log.info("lb: service %s (id %d) removed", name, old.id)

    def _collect_backends(self) -> None:
        """Backends no applied service names (after the slots that named them) turn
        terminating: their established flows go on, new ones cannot pick them; they leave
        lb4_backends once no live conntrack entry names them (`_drain`). Not before the
        first full list: services not yet applied still use theirs."""
        if not self.mirror.synced.is_set():
            return
        wanted = {(b.ip, b.port, s.frontend.proto_number)
                  for s in self.applied.values() for b in s.backends}
        for key in [k for k in self.backend_ids if k not in wanted]:
            backend_id = self.backend_ids.pop(key)
            if self.maps is not None:
                self.maps.upsert_backend(backend_id, *key, "terminating")
                self.draining[key] = backend_id
        if self.draining and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Remove draining backends whose flows ended (their conntrack entries expired or
        were collected); a backend added back while the table was read has left
        `draining` with its id (the loop below reads `draining` after that)."""
        while self.draining:
            await asyncio.sleep(DRAIN_CHECK_S)
            try:
                in_use = await asyncio.to_thread(self.datapath.ct_service_peers)
            except Exception as exc:  # the datapath closing under us: try again later
                log.warning("lb: draining backends: %s", exc)
                continue
            for key, backend_id in list(self.draining.items()):
                if key not in in_use:
                    del self.draining[key]
                    self.maps.delete_backend(backend_id)
                    log.info("lb: backend %s:%d removed (no flow uses it)", key[0], key[1])

    # API -------------------------------------------------------------------------------
    async def upsert(self, svc: Service) -> Service:
        stored = await self.store.put(svc)
        await self._wait_applied(lambda: self.applied.get(stored.name) == stored)
        return stored

    async def delete(self, name_or_id: str) -> Service | None:
        removed = await self.store.delete(name_or_id)
        if removed is not None:
            await self._wait_applied(lambda: removed.name not in self.applied)
        return removed

    async def _wait_applied(self, done) -> None:
        """The API answers once this node's maps carry the change (other nodes follow
        through their own watch)."""
        try:
            async with asyncio.timeout(APPLY_WAIT_S):
                while not done():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            log.warning("lb: change stored but not yet applied after %.0fs", APPLY_WAIT_S)

    def list(self) -> list[Service]:
        return sorted(self.applied.values(), key=lambda s: s.id)

    def by_rev_nat(self, index: int) -> tuple[Service, str] | None:
        """The service a datapath rev-NAT index names, and the frontend that index is for
        (the VIP, or this node's NodePort): how flows name the service they went through."""
        nodeport = index >= NODEPORT_INDEX_OFFSET
        wanted = index - NODEPORT_INDEX_OFFSET if nodeport else index
        # list() copies in one step: the flow reader thread asks while the loop applies
        by_id = {s.id: s for s in list(self.applied.values())}
        svc = by_id.get(wanted)
        if svc is None or (nodeport and not svc.node_port):
            return None
        if nodeport:
            return svc, f"{self.node_ip}:{svc.node_port}/{svc.frontend.protocol}"
        return svc, str(svc.frontend)

    def metric_families(self):
        """Prometheus families, collected at scrape time by the agent's collector."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        events = CounterMetricFamily("pylium_services_events", "Service changes applied "
                                     "to this node (Cilium: cilium_services_events_total).",
                                     labels=["action"])
        for action in ("add", "update", "delete"):
            events.add_metric([action], self.events[action])
        yield events
        yield GaugeMetricFamily("pylium_services", "Services applied to this node.",
                                value=len(self.applied))

    def status(self) -> dict[str, Any]:
        return {"services": len(self.applied), "backends": len(self.backend_ids),
                "draining_backends": sorted(f"{ip}:{port}" for ip, port, _ in self.draining),
                "algorithm": self.options["algorithm"],
                "maglev_table_size": self.options["maglev_table_size"],
                "maglev_mode": self.options["maglev_mode"],
                "events": dict(self.events), "datapath": self.maps is not None,
                "nodeport_device": self.nodeport_device,
                "socket_lb_cgroup": self.options["socket_lb_cgroup"] or None,
                "acceleration": self.xdp_mode or "disabled"}


async def start(daemon) -> LoadBalancer | None:
    if daemon.kvstore is None:
        return None
    lb = LoadBalancer(daemon, lb_options(daemon.config))
    await lb.start()
    return lb
