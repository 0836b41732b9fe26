"""Agent component: the endpoint manager, wired to the identity, policy and datapath
components through small adapters (the only place that knows their APIs)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pylium.endpoint.manager import EndpointManager
from pylium.endpoint.model import NOT_READY, Endpoint
from pylium.ipam import PodCIDRAllocator

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 10.0


class IdentityAdapter:
    """`pylium.identity.manager.IdentityManager`: labels → numeric identity via the KV store."""

    def __init__(self, identities: Any):
        self.identities = identities

    async def allocate(self, labels: dict[str, str]) -> int:
        from pylium.identity.labels import LabelSet

        identity = await self.identities.allocate(
            LabelSet.parse([f"{k}={v}" for k, v in labels.items()]))
        return int(identity.id)

    async def release(self, identity: int) -> None:
        await self.identities.release(identity)


class PolicyAdapter:
    """`pylium.policy.component.PolicyService`: the engine's per-identity map state, with
    L7 redirects that no running proxy serves turned into denies (fail closed)."""

    def __init__(self, service: Any, served_proxy_ports):
        self.engine = service.engine
        self.served_proxy_ports = served_proxy_ports

    async def compute(self, endpoint: Endpoint) -> Any:
        from pylium.policy.mapstate import deny_unserved_redirects

        policy, turned = deny_unserved_redirects(
            self.engine.endpoint_policy(endpoint.identity), self.served_proxy_ports())
        if turned:
            ports = sorted({k.port_range[0] for k in turned})
            log.warning("endpoint %s: L7 rules on port(s) %s are enforced as deny: no L7 "
                        "proxy runs for them (select an L7 parser plugin)", endpoint.id, ports)
        return policy


def served_proxy_ports(daemon) -> set[int]:
    """Proxy ports an L7 proxy listens on: an `l7` component publishes `proxy_ports`."""
    return set(getattr(daemon.components.get("l7"), "proxy_ports", ()))


class NoRulesPolicy:
    """Stands in while no policy repository runs in this agent: the policy of an empty
    repository (Cilium's enforcement modes: `always` enforces with nothing allowed,
    `default` and `never` enforce nothing)."""

    def __init__(self, enforcement: str):
        self.enforce = enforcement == "always"

    async def compute(self, endpoint: Endpoint) -> Any:
        from pylium.policy.mapstate import EndpointPolicy

        return EndpointPolicy(ingress_enforced=self.enforce, egress_enforced=self.enforce)


def _endpoint_info(ep: Endpoint) -> Any:
    """What the datapath's endpoints map holds of `ep`."""
    from pylium.datapath import EndpointInfo

    return EndpointInfo(ep_id=ep.id, ipv4=ep.ipv4, ifindex=ep.ifindex, ep_mac=ep.pod_mac,
                        host_mac=ep.mac, identity=ep.identity)


class DatapathAdapter:
    """`pylium.datapath.Datapath`: the endpoints map + programs on the host-side veth, the
    endpoint's /32 in the ipcache (Cilium keeps local endpoints there too), and the
    per-endpoint policy map."""

    def __init__(self, datapath: Any):
        self.datapath = datapath
        #: policy swaps sleep through an RCU grace period in the kernel (every update of a
        #: map-in-map slot does): on threads of their own, so the pods of a node starting
        #: together wait out one period side by side instead of queueing for the default
        #: pool's few threads (and holding up the work queued there)
        self._policy_threads = ThreadPoolExecutor(max_workers=32,
                                                  thread_name_prefix="pylium-ep-policy")

    async def attach(self, ep: Endpoint) -> None:
        info = _endpoint_info(ep)

        def attach() -> None:  # one thread hop: each costs a scheduling delay on a busy node
            self.datapath.attach_endpoint(info)
            self.datapath.upsert_ipcache(f"{ep.ipv4}/32", ep.identity)

        await asyncio.to_thread(attach)

    async def publish(self, ep: Endpoint, policy: Any,
                      then: Any = None) -> BaseException | None:
        """A new endpoint's whole datapath start in one job of a policy thread: published
        (endpoints map, ipcache), its prepared policy map filled with `policy` (None: left
        empty), then `then(filled)` (the manager's state file write). A pod start paid one
        thread hop for each before. A publish that fails raises; a fill that fails is
        returned (the endpoint stays published, its policy is regenerated)."""
        info = _endpoint_info(ep)

        def job() -> BaseException | None:
            # a new endpoint: `ep.mac` is what the kernel answered when the veth was made
            self.datapath.attach_endpoint(info, mac_seen=ep.mac)
            self.datapath.upsert_ipcache(f"{ep.ipv4}/32", ep.identity)
            failed = None
            if policy is not None:
                try:
                    self.datapath.update_policy(ep.id, policy)
                except Exception as exc:
                    failed = exc
            if then is not None:
                then(failed is None)
            return failed

        return await asyncio.get_running_loop().run_in_executor(self._policy_threads, job)

    def attach_programs(self, host: Any) -> None:
        """The programs on a new veth's host end (a netlink thread's call, see
        `Datapath.attach_programs`)."""
        self.datapath.attach_programs(host.ifindex, host.mac)

    async def detach(self, ep: Endpoint) -> None:
        def detach() -> None:
            self.datapath.detach_endpoint(ep.id)
            self.datapath.delete_ipcache(f"{ep.ipv4}/32")

        await asyncio.to_thread(detach)

    async def unpublish(self, ep: Endpoint) -> None:
        """`detach` in two halves (`forget` the other), so the second half's RCU grace
        period can overlap the veth's removal."""
        def unpublish() -> None:
            self.datapath.unpublish_endpoint(ep.id)
            self.datapath.delete_ipcache(f"{ep.ipv4}/32")

        await asyncio.to_thread(unpublish)

    async def forget(self, ep: Endpoint) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._policy_threads, self.datapath.forget_endpoint, ep.id)

    async def update_policy(self, ep: Endpoint, policy: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._policy_threads, self.datapath.update_policy, ep.id, policy)

    async def prepare_policy(self, ep_id: int) -> bool:
        return await asyncio.get_running_loop().run_in_executor(
            self._policy_threads, self.datapath.prepare_policy, ep_id)

    def policy_in_place(self, ep_id: int) -> bool:
        """One map lookup: cheap enough for the event loop."""
        return self.datapath.policy_in_place(ep_id)

    async def release_policy(self, ep_id: int) -> bool:
        return await asyncio.get_running_loop().run_in_executor(
            self._policy_threads, self.datapath.release_policy, ep_id)


async def start(daemon) -> EndpointManager:
    cfg = daemon.config
    ipam = PodCIDRAllocator(cfg.pod_cidr, cfg.state_dir / "ipam.json")
    identities = daemon.components.get("identity")
    policy = daemon.components.get("policy")
    datapath = daemon.components.get("datapath")
    hook = daemon.plugins.hook
    manager = EndpointManager(
        cfg.state_dir, ipam,
        identities=IdentityAdapter(identities) if identities is not None else None,
        policy=(PolicyAdapter(policy, lambda: served_proxy_ports(daemon)) if policy is not None
                else NoRulesPolicy(cfg.enforcement)),
        datapath=DatapathAdapter(datapath) if datapath is not None else None,
        on_created=lambda ep: hook.pylium_endpoint_created(endpoint=ep),
        on_deleted=lambda ep: hook.pylium_endpoint_deleted(endpoint=ep),
    )
    routing = daemon.components.get("routing")
    if routing is not None:
        encryption = daemon.components.get("encryption")
        manager.mtu = routing.pod_mtu - (encryption.mtu_overhead if encryption else 0)
    if policy is None:
        manager.missing.append("policy")
    if manager.missing:
        log.warning("endpoint manager running without: %s", ", ".join(manager.missing))
    restored = await manager.restore()
    log.info("endpoints: adopted %s, dropped %s", restored["adopted"], restored["dropped"])
    if identities is not None and datapath is not None:
        _sync_cidr_identities(identities.cache, datapath)
    if policy is not None:
        _follow_policy_changes(daemon, manager, policy.engine)
    await manager.regenerate_all("agent start")
    daemon.spawn(_retry_not_ready(manager))
    return manager


async def _retry_not_ready(manager: EndpointManager, interval: float = RETRY_INTERVAL_S) -> None:
    """Endpoints whose regeneration failed keep their old policy; try them again now and
    then (Cilium retries failed regenerations too)."""
    while True:
        await asyncio.sleep(interval)
        stuck = {ep.id: ep.identity for ep in manager.list() if ep.state == NOT_READY}
        if stuck:
            log.info("retrying regeneration of not-ready endpoints %s", sorted(stuck))
            try:
                await manager.regenerate_identities(set(stuck.values()), "retry")
            except Exception:
                log.exception("regeneration retry failed")


def _sync_cidr_identities(cache: Any, datapath: Any) -> None:
    """CIDR identities (made for `toCIDR`/`fromCIDR` rules) go into the ipcache, so the
    datapath gives packets from/to those prefixes that identity instead of world."""

    def push(added: list, removed: list) -> None:
        for identity in removed:
            if getattr(identity, "cidr", None) is not None:
                datapath.delete_ipcache(str(identity.cidr))
        for identity in added:
            if getattr(identity, "cidr", None) is not None and identity.cidr.version == 4:
                datapath.upsert_ipcache(str(identity.cidr), identity.id)

    push(cache.all(), [])
    cache.subscribe(push)


def _follow_policy_changes(daemon, manager: EndpointManager, engine: Any) -> None:
    """Queue the identities the engine says changed and regenerate their endpoints. Changes
    arriving while a regeneration runs are coalesced into one more pass."""
    pending = manager.pending_identities
    state = {"task": None}

    async def run() -> None:
        # the queue is taken under the manager's lock: a create that got the lock first
        # regenerates the queued identities itself, and this pass finds nothing left
        while pending:
            await manager.regenerate_pending("policy or identity change")

    def on_change(change: Any) -> None:
        pending.update(change.identities)
        task = state["task"]
        if task is None or task.done():
            state["task"] = daemon.spawn(run())
            manager.regeneration_tasks.append(state["task"])

    engine.subscribe(on_change)
