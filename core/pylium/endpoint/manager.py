"""Endpoint lifecycle: create (veth, IP, routes, identity, datapath, policy), delete,
regenerate, and restore after an agent restart.

The manager talks to its neighbours through three small ports (`IdentityPort`, `PolicyPort`,
`DatapathPort`, below); `endpoint.component` adapts the agent's identity, policy and datapath
components to them, and tests can hand in their own.

Regeneration (Cilium's `regenerateEndpoint`): every endpoint's policy is recomputed from the
policy repository and handed to the datapath, which swaps the endpoint's whole policy map at
once. If computing or loading fails the endpoint keeps the policy it had (the datapath never
sees an empty or partial map), goes `not-ready` with the error, and the error is logged —
Cilium issue #38998 was an endpoint silently left with an empty map.

Restore (Cilium's `restoreOldEndpoints`): endpoints are persisted one JSON file each under
`<state_dir>/endpoints/`. On start the manager adopts every endpoint whose veth and netns are
still there — same id, IP and veth, pinned maps re-read by the datapath — and cleans up the
ones whose pod went away while the agent was down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from pylium.datapath import netns as plumbing
from pylium.endpoint.model import (
    MAX_ENDPOINT_ID,
    MIN_ENDPOINT_ID,
    NOT_READY,
    READY,
    REGENERATING,
    Endpoint,
    endpoint_from_json,
    endpoint_to_json,
    host_ifname,
    validate_labels,
    validate_name,
)
from pylium.errors import PyliumError, UserError
from pylium.ipam import PodCIDRAllocator

log = logging.getLogger(__name__)


class EndpointNotFound(UserError):
    """No endpoint with that id or name (HTTP 404)."""


class IdentityPort(Protocol):
    async def allocate(self, labels: dict[str, str]) -> int: ...

    async def release(self, identity: int) -> None: ...


class PolicyPort(Protocol):
    async def compute(self, endpoint: Endpoint) -> Any:
        """The endpoint's `pylium.policy.mapstate.EndpointPolicy`."""


class DatapathPort(Protocol):
    async def attach(self, endpoint: Endpoint) -> None: ...

    async def detach(self, endpoint: Endpoint) -> None: ...

    async def update_policy(self, endpoint: Endpoint, policy: Any) -> None: ...


class EndpointManager:
    def __init__(
        self,
        state_dir: Path,
        ipam: PodCIDRAllocator,
        identities: IdentityPort | None = None,
        policy: PolicyPort | None = None,
        datapath: DatapathPort | None = None,
        on_created: Callable[[Endpoint], None] | None = None,
        on_deleted: Callable[[Endpoint], None] | None = None,
    ):
        self.dir = Path(state_dir) / "endpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ipam = ipam
        self.identities = identities
        self.policy = policy
        self.datapath = datapath
        self.on_created = on_created
        self.on_deleted = on_deleted
        self._endpoints: dict[int, Endpoint] = {}
        #: veth MTU of new endpoints (the routing component's pod MTU)
        self.mtu = 1500
        self._lock = asyncio.Lock()
        #: what the manager could not do for want of a component ("" when all are there)
        self.missing = [name for name, part in
                        (("identity", identities), ("policy", policy), ("datapath", datapath))
                        if part is None]
        self.last_regeneration: dict[str, Any] = {}
        #: identities whose endpoints await regeneration, and the tasks doing it
        self.pending_identities: set[int] = set()
        self.regeneration_tasks: list[asyncio.Task] = []

    def regeneration_status(self) -> dict[str, Any]:
        """`busy` while a policy or identity change has not reached every endpoint yet."""
        self.regeneration_tasks = [t for t in self.regeneration_tasks if not t.done()]
        return {"busy": bool(self.pending_identities or self.regeneration_tasks
                             or self._lock.locked()),
                "not_ready": [ep.id for ep in self._endpoints.values() if ep.state != READY],
                "last": self.last_regeneration}

    # queries ------------------------------------------------------------------------------
    def list(self) -> list[Endpoint]:
        return [self._endpoints[i] for i in sorted(self._endpoints)]

    def get(self, ref: str | int) -> Endpoint:
        """An endpoint by id, name, or `namespace/name`."""
        text = str(ref)
        if text.isdigit() and int(text) in self._endpoints:
            return self._endpoints[int(text)]
        for ep in self._endpoints.values():
            if text in (ep.name, f"{ep.namespace}/{ep.name}"):
                return ep
        raise EndpointNotFound(f"endpoint {text} not found")

    # persistence --------------------------------------------------------------------------
    def _save(self, ep: Endpoint) -> None:
        self._endpoints[ep.id] = ep
        path = self.dir / f"{ep.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoint_to_json(ep), indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _forget(self, ep: Endpoint) -> None:
        self._endpoints.pop(ep.id, None)
        (self.dir / f"{ep.id}.json").unlink(missing_ok=True)

    def _free_id(self) -> int:
        used = set(self._endpoints) | {int(p.stem) for p in self.dir.glob("*.json")
                                       if p.stem.isdigit()}
        for candidate in range(MIN_ENDPOINT_ID, MAX_ENDPOINT_ID + 1):
            if candidate not in used:
                return candidate
        raise PyliumError(f"no free endpoint id (all {MAX_ENDPOINT_ID} in use)")

    # lifecycle ----------------------------------------------------------------------------
    async def create(self, name: str, namespace: str, labels: dict[str, str] | None,
                     netns: str) -> Endpoint:
        validate_name("name", name)
        validate_name("namespace", namespace)
        labels = validate_labels(labels)
        if not isinstance(netns, str) or not netns:
            raise UserError("netns: give the pod's network namespace (a name under "
                            "/run/netns or an absolute path)")
        if not plumbing.netns_exists(netns):
            raise UserError(f"netns: {netns} does not exist")
        async with self._lock:
            for ep in self._endpoints.values():
                if (ep.namespace, ep.name) == (namespace, name):
                    raise UserError(f"endpoint {namespace}/{name} already exists (id {ep.id})")
                if plumbing.netns_path(ep.netns) == plumbing.netns_path(netns):
                    raise UserError(f"netns: {netns} already belongs to endpoint "
                                    f"{ep.namespace}/{ep.name}")
            ep_id = self._free_id()
            owner = f"endpoint:{namespace}/{name}"
            address = self.ipam.allocate(owner)
            ifname = host_ifname(namespace, name)
            undo: list[Callable[[], Any]] = [lambda: self.ipam.release(address)]
            if await asyncio.to_thread(plumbing.link_info, ifname) is not None:
                # named after this namespace/name and owned by no endpoint: left by an
                # agent that died half way through creating it
                log.warning("removing stale %s left by an unfinished create", ifname)
                await asyncio.to_thread(plumbing.unwire_endpoint, ifname)
            try:
                links = await asyncio.to_thread(plumbing.wire_endpoint, ifname, netns,
                                                address, str(self.ipam.gateway),
                                                mtu=self.mtu)
                undo.append(lambda: plumbing.unwire_endpoint(ifname, address))
                ep = Endpoint(id=ep_id, name=name, namespace=namespace, labels=labels,
                              netns=netns, ipv4=address, ifname=ifname,
                              ifindex=links.host.ifindex, mac=links.host.mac,
                              pod_mac=links.pod.mac)
                ep = await self._resolve_identity(ep)
                if self.identities is not None:
                    undo.append(lambda: self.identities.release(ep.identity))
                self._save(ep)
                undo.append(lambda: self._forget(ep))
                if self.datapath is not None:
                    await self.datapath.attach(ep)
            except BaseException:
                for step in reversed(undo):
                    try:
                        result = step()
                        if asyncio.iscoroutine(result):
                            await result
                    except Exception:
                        log.exception("undoing a failed endpoint create")
                raise
            log.info("endpoint %d %s/%s created: %s on %s, identity %d",
                     ep.id, namespace, name, address, ifname, ep.identity)
        # a new identity can change what other endpoints' selectors select
        await self.regenerate_all(f"endpoint {ep.id} created")
        ep = self._endpoints[ep.id]
        if self.on_created is not None:
            self.on_created(ep)
        return ep

    async def delete(self, ref: str | int) -> Endpoint:
        async with self._lock:
            ep = self.get(ref)
            if self.datapath is not None:
                try:
                    await self.datapath.detach(ep)
                except Exception:
                    log.exception("detaching endpoint %d from the datapath failed", ep.id)
            await asyncio.to_thread(plumbing.unwire_endpoint, ep.ifname, ep.ipv4)
            self.ipam.release(ep.ipv4)
            self._forget(ep)
            if self.identities is not None and ep.identity:
                try:
                    await self.identities.release(ep.identity)
                except Exception:
                    log.exception("releasing identity %d failed", ep.identity)
            log.info("endpoint %d %s/%s deleted", ep.id, ep.namespace, ep.name)
        await self.regenerate_all(f"endpoint {ep.id} deleted")
        if self.on_deleted is not None:
            self.on_deleted(ep)
        return ep

    async def set_labels(self, ref: str | int, labels: dict[str, str]) -> Endpoint:
        labels = validate_labels(labels)
        async with self._lock:
            ep = self.get(ref)
            old_identity = ep.identity
            ep = await self._resolve_identity(attrs.evolve(ep, labels=labels))
            self._save(ep)
            if self.datapath is not None:
                await self.datapath.attach(ep)  # re-publishes the endpoint's identity
            if self.identities is not None and old_identity and old_identity != ep.identity:
                await self.identities.release(old_identity)
        await self.regenerate_all(f"endpoint {ep.id} labels changed")
        return self._endpoints[ep.id]

    async def _resolve_identity(self, ep: Endpoint) -> Endpoint:
        if self.identities is None:
            return ep
        identity = await self.identities.allocate(ep.identity_labels)
        return attrs.evolve(ep, identity=int(identity))

    # regeneration -------------------------------------------------------------------------
    async def regenerate_all(self, reason: str) -> dict[str, Any]:
        """Recompute and load every endpoint's policy. One failing endpoint does not stop the
        others; each failure leaves that endpoint's previous policy in place."""
        return await self._regenerate_where(lambda ep: True, reason)

    async def regenerate_identities(self, identities: set[int], reason: str) -> dict[str, Any]:
        """Regenerate only the endpoints whose identity is in `identities`."""
        return await self._regenerate_where(lambda ep: ep.identity in identities, reason)

    async def _regenerate_where(self, selected, reason: str) -> dict[str, Any]:
        """`last_regeneration` reports how many endpoints this pass regenerated (not how
        many exist) and which of them failed."""
        async with self._lock:
            failed = {}
            chosen = [ep for ep in self._endpoints.values() if selected(ep)]
            for ep in chosen:
                error = await self._regenerate(ep)
                if error:
                    failed[ep.id] = error
            self.last_regeneration = {"reason": reason, "endpoints": len(chosen),
                                      "failed": failed}
            return self.last_regeneration

    async def _regenerate(self, ep: Endpoint) -> str:
        if self.policy is None or self.datapath is None:
            if ep.state != READY:
                self._save(attrs.evolve(ep, state=READY, error=""))
            return ""
        self._endpoints[ep.id] = attrs.evolve(ep, state=REGENERATING)
        try:
            policy = await self.policy.compute(ep)
            await self.datapath.update_policy(ep, policy)
        except Exception as exc:
            error = f"policy regeneration failed, previous policy kept: {exc}"
            log.error("endpoint %d %s/%s: %s", ep.id, ep.namespace, ep.name, error)
            self._save(attrs.evolve(ep, state=NOT_READY, error=error))
            return error
        self._save(attrs.evolve(
            ep, state=READY, error="",
            ingress_enforced=bool(getattr(policy, "ingress_enforced", False)),
            egress_enforced=bool(getattr(policy, "egress_enforced", False)),
            policy_revision=int(getattr(policy, "revision", 0))))
        return ""

    # restore ------------------------------------------------------------------------------
    async def restore(self) -> dict[str, list[int]]:
        """Adopt the endpoints a previous agent left (see the module docstring)."""
        adopted, dropped = [], []
        async with self._lock:
            for path in sorted(self.dir.glob("*.json"), key=lambda p: int(p.stem)
                               if p.stem.isdigit() else 0):
                try:
                    ep = endpoint_from_json(json.loads(path.read_text()))
                except Exception as exc:
                    log.error("ignoring unreadable endpoint state %s: %s", path, exc)
                    continue
                link = await asyncio.to_thread(plumbing.link_info, ep.ifname)
                if link is None or link.ifindex != ep.ifindex or \
                        not plumbing.netns_exists(ep.netns):
                    log.warning("endpoint %d %s/%s is gone (veth or netns missing): cleaning up",
                                ep.id, ep.namespace, ep.name)
                    await asyncio.to_thread(plumbing.unwire_endpoint, ep.ifname, ep.ipv4)
                    self.ipam.release(ep.ipv4)
                    path.unlink(missing_ok=True)
                    dropped.append(ep.id)
                    continue
                self.ipam.allocate_specific(ep.ipv4, f"endpoint:{ep.namespace}/{ep.name}")
                try:
                    ep = await self._resolve_identity(ep)
                    self._save(ep)
                    if self.datapath is not None:
                        await self.datapath.attach(ep)
                except Exception as exc:
                    error = f"restore failed: {exc}"
                    log.error("endpoint %d: %s", ep.id, error)
                    ep = attrs.evolve(ep, state=NOT_READY, error=error)
                self._save(ep)
                adopted.append(ep.id)
            # addresses held for endpoints that no longer have a state file leak otherwise
            owners = {f"endpoint:{e.namespace}/{e.name}" for e in self._endpoints.values()}
            for address, owner in self.ipam.allocated().items():
                if owner.startswith("endpoint:") and owner not in owners:
                    self.ipam.release(address)
        if adopted:
            log.info("restored endpoints %s", adopted)
        return {"adopted": adopted, "dropped": dropped}

    async def close(self) -> None:
        """Nothing to tear down: endpoints outlive the agent (that is the point of restore)."""
