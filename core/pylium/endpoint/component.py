"""Agent component: the endpoint manager, wired to the identity, policy and datapath
components through small adapters (the only place that knows their APIs)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pylium.endpoint.manager import EndpointManager
from pylium.endpoint.model import Endpoint
from pylium.ipam import PodCIDRAllocator

log = logging.getLogger(__name__)


class IdentityAdapter:
    def __init__(self, identities: Any):
        self.identities = identities

    async def allocate(self, labels: dict[str, str]) -> int:
        result = self.identities.allocate(labels)
        if asyncio.iscoroutine(result):
            result = await result
        return int(getattr(result, "id", result))

    async def release(self, identity: int) -> None:
        release = getattr(self.identities, "release", None)
        if release is None:
            return
        result = release(identity)
        if asyncio.iscoroutine(result):
            await result


class PolicyAdapter:
    def __init__(self, repository: Any, identities: Any):
        self.repository = repository
        self.identities = identities

    async def compute(self, endpoint: Endpoint) -> Any:
        result = self.repository.endpoint_policy(endpoint.identity_labels, endpoint.identity)
        if asyncio.iscoroutine(result):
            result = await result
        return result


class DatapathAdapter:
    def __init__(self, datapath: Any):
        self.datapath = datapath

    def _info(self, ep: Endpoint) -> Any:
        from pylium.datapath import EndpointInfo  # the datapath component's record

        return EndpointInfo(id=ep.id, ifindex=ep.ifindex, ifname=ep.ifname, ipv4=ep.ipv4,
                            mac=ep.mac, pod_mac=ep.pod_mac, identity=ep.identity)

    async def attach(self, ep: Endpoint) -> None:
        await asyncio.to_thread(self.datapath.attach_endpoint, self._info(ep))

    async def detach(self, ep: Endpoint) -> None:
        await asyncio.to_thread(self.datapath.detach_endpoint, ep.id)

    async def update_policy(self, ep: Endpoint, policy: Any) -> None:
        await asyncio.to_thread(self.datapath.update_policy, ep.id, policy)


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
        policy=PolicyAdapter(policy, identities) if policy is not None else None,
        datapath=DatapathAdapter(datapath) if datapath is not None else None,
        on_created=lambda ep: hook.pylium_endpoint_created(endpoint=ep),
        on_deleted=lambda ep: hook.pylium_endpoint_deleted(endpoint=ep),
    )
    if manager.missing:
        log.warning("endpoint manager running without: %s", ", ".join(manager.missing))
    restored = await manager.restore()
    await manager.regenerate_all("agent start")
    log.info("endpoints: adopted %s, dropped %s", restored["adopted"], restored["dropped"])
    return manager
