"""Endpoint lifecycle: create (veth, IP, routes, identity, datapath, policy), delete,
regenerate, and restore after an agent restart.

The manager talks to its neighbours through three small ports (`IdentityPort`, `PolicyPort`,
`DatapathPort`, below); `endpoint.component` adapts the agent's identity, policy and datapath
components to them, and tests can hand in their own.

Regeneration (Cilium's `regenerateEndpoint`): an endpoint's policy is recomputed from the
policy repository and handed to the datapath, which swaps the endpoint's whole policy map at
once. Only what a change can affect is regenerated: a create, delete or label change
regenerates that endpoint plus the endpoints of the identities the policy side queued in
`pending_identities` (a new identity matters only to the endpoints whose selectors select it;
an identity the node already knows changes nothing for the others), so creating the 250th
endpoint costs what the first did.

If computing or loading fails the endpoint keeps the policy it had (the datapath never sees
an empty or partial map), goes `not-ready` with the error, and the error is logged — Cilium
issue #38998 was an endpoint silently left with an empty map.

Restore (Cilium's `restoreOldEndpoints`): endpoints are persisted one JSON file each under
`<state_dir>/endpoints/`. On start the manager adopts every endpoint whose veth and netns are
still there — same id, IP and veth, pinned maps re-read by the datapath — and cleans up the
ones whose pod went away while the agent was down."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import attrs
from pyroute2 import NetlinkError

from pylium.api.kvstore import KVStoreUnavailable
from pylium.datapath import netns as plumbing
from pylium.endpoint.model import (
    MAX_ENDPOINT_ID,
    MIN_ENDPOINT_ID,
    NOT_READY,
    READY,
    REGENERATING,
    Endpoint,
    container_owner,
    endpoint_from_json,
    endpoint_to_json,
    host_ifname,
    identity_labels,
    validate_container_id,
    validate_ifname,
    validate_labels,
    validate_name,
)
from pylium.errors import Conflict, PyliumError, UserError
from pylium.heap import Trimmer
from pylium.ipam import PodCIDRAllocator

log = logging.getLogger(__name__)
#: how long a netlink thread waits for a create's address once its veth is made (the IPAM
#: thread answers in milliseconds; a create that waits longer fails and its veth goes)
ADDRESS_WAIT_S = 30.0


def _netns_file(netns: str) -> str:
    """The file that names `netns`, normalised (equal exactly when the `Path`s are)."""
    return str(plumbing.netns_path(netns))


def _ready_under(ep: Endpoint, policy: Any) -> Endpoint:
    """`ep` once `policy` is loaded for it: ready, with what the policy enforces."""
    return attrs.evolve(
        ep, state=READY, error="",
        ingress_enforced=bool(getattr(policy, "ingress_enforced", False)),
        egress_enforced=bool(getattr(policy, "egress_enforced", False)),
        policy_revision=int(getattr(policy, "revision", 0)))


class EndpointNotFound(UserError):
    """No endpoint with that id or name (HTTP 404)."""


class IdentityPort(Protocol):
    async def allocate(self, labels: dict[str, str]) -> int: ...

    async def release(self, identity: int) -> None: ...


class PolicyPort(Protocol):
    async def compute(self, endpoint: Endpoint) -> Any:
        """The endpoint's `pylium.policy.mapstate.EndpointPolicy`."""


class DatapathPort(Protocol):
    """Optional besides these: `prepare_policy(ep_id)` / `release_policy(ep_id)`, an empty
    policy map put in a new endpoint's slot while its veth is made (`Datapath.prepare_policy`);
    `unpublish(ep)` / `forget(ep)`, `detach` in two halves (the endpoint's packets stop,
    then its policy map and conntrack entries go while its veth is removed);
    `attach_programs(host_link)`, called on a netlink thread before the pod end of a new
    veth comes up (`Datapath.attach_programs`)."""

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
        netlink_threads: int = 1,
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
        #: creates per container id still running
        self._pending: dict[str, int] = {}
        #: creates and deletes of one attachment (container id, or namespace/name) run one
        #: at a time in arrival order; different pods' run side by side
        self._attachment_locks: dict[str, asyncio.Lock] = {}
        #: ids of creates wiring outside the lock → (namespace, name, netns, netns key) they
        #: claimed (the key once: a create compares its netns with every other create's)
        self._creating: dict[int, tuple[str, str, str, tuple[int, int] | None]] = {}
        #: endpoint id → (device, inode) of its netns when it was made: a create compares
        #: its netns with every endpoint's, one stat each on the event loop otherwise
        self._netns_keys: dict[int, tuple[int, int] | None] = {}
        #: endpoint id → (its netns as given, the file that names it): a create compares
        #: that file with every endpoint's; two `Path`s built per endpoint per create cost
        #: ~5 us each time on the event loop (a node with 100 pods: ~0.5 ms per create)
        self._netns_files: dict[int, tuple[str, str]] = {}
        #: ids of state files that belong to no endpoint (see `_free_id`)
        self._stray_ids: set[int] | None = None
        #: endpoints whose create waits for a regeneration pass (any pass takes them all)
        self._regen_wanted: set[int] = set()
        #: endpoints unlisted and being torn down outside the lock
        self._deleting: dict[int, Endpoint] = {}
        #: DELs per container id queued behind a create of that container
        self._deletes_waiting: dict[str, int] = {}
        #: state files are written by one thread, in the order the loop asks: never on the
        #: event loop (a write or unlink can stall for tens of ms on a busy disk) and never
        #: two writes of one file racing
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pylium-ep-state")
        #: veth work runs on a thread that keeps its netlink socket between pods. One by
        #: default: the kernel makes links one at a time (rtnl lock) anyway, and more
        #: threads only add GIL hand-offs between their many short syscalls (20 pods wired:
        #: ~27 ms on one thread, 50-75 ms on two or four; a 20-pod CNI burst answers its
        #: median ADD ~25 % sooner and costs ~20 % less agent CPU). Creates still wire
        #: outside the manager's lock: each waits only for the thread
        self._netlink = ThreadPoolExecutor(max_workers=netlink_threads,
                                           thread_name_prefix="pylium-ep-netlink",
                                           initializer=plumbing.reuse_netlink_socket)
        #: veth removals mostly sleep in the kernel (RCU grace periods, not under the rtnl
        #: lock for all of it): the pods of a node stopping together overlap those waits on
        #: threads of their own (20 removals: ~35 ms on 20 threads, ~180 ms on 4)
        self._unwiring = ThreadPoolExecutor(max_workers=32,
                                            thread_name_prefix="pylium-ep-unwire",
                                            initializer=plumbing.reuse_netlink_socket)
        #: addresses are handed out on a thread of their own, off the netlink thread that
        #: wires pods one at a time (an allocation reads and writes the IPAM state file:
        #: ~2 ms on a busy disk, which the next pod's veth no longer waits behind); the
        #: creates asking while one batch is being written share the next batch's write
        self._ipam_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pylium-ep-ipam")
        self._wanted_addresses: list[tuple[str, asyncio.Future]] = []
        self._allocating = False
        #: once creates and deletes pause, the pages they freed go back to the system (on
        #: the state thread, off the event loop)
        self._trimmer = Trimmer(self._io.submit)
        #: the policy each endpoint's datapath map holds (as last loaded by this agent)
        self._installed: dict[int, Any] = {}
        #: endpoint id → the last state file write asked for it and not done yet, and the
        #: state that write holds
        self._writes: dict[int, asyncio.Future] = {}
        self._filed: dict[int, Endpoint] = {}
        #: set by an orchestrator that knows pods' labels (Kubernetes): called as
        #: `await label_resolver(namespace, name)` before a new endpoint gets its identity, so
        #: a pod never runs under a label-less identity that policies do not select
        self.label_resolver: Callable[[str, str], Any] | None = None

    def regeneration_status(self) -> dict[str, Any]:
        """`busy` while a policy or identity change has not reached every endpoint yet."""
        self.regeneration_tasks = [t for t in self.regeneration_tasks if not t.done()]
        return {"busy": bool(self.pending_identities or self.regeneration_tasks
                             or self._lock.locked() or self._creating),
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

    def find_container(self, container_id: str) -> Endpoint | None:
        """The endpoint a CNI ADD made for `container_id`, or None."""
        for ep in self._endpoints.values():
            if ep.container_id and ep.container_id == container_id:
                return ep
        return None

    # persistence --------------------------------------------------------------------------
    async def _save(self, ep: Endpoint) -> None:
        """Make `ep` the endpoint's current state (at once) and its state file (on the
        state thread; returns once written)."""
        await self._save_soon(ep)

    def _save_soon(self, ep: Endpoint) -> asyncio.Future:
        """`_save` without the wait: `ep` is current at once, its state file is written on
        the state thread in the order asked; the future is done once it is (`_written`)."""
        self._endpoints[ep.id] = ep
        future = asyncio.get_running_loop().run_in_executor(self._io, self._state_writer(ep))
        self._writes[ep.id] = future
        self._filed[ep.id] = ep
        future.add_done_callback(lambda done: self._write_done(ep.id, done))
        return future

    def _write_done(self, ep_id: int, done: asyncio.Future) -> None:
        if self._writes.get(ep_id) is done:
            del self._writes[ep_id]
        if not done.cancelled() and done.exception() is not None:
            self._filed.pop(ep_id, None)
            log.error("writing the state of endpoint %d failed: %s", ep_id, done.exception())

    async def _written(self, ep: Endpoint) -> None:
        """Wait until the endpoint's state file holds `ep` (written now if it was not asked
        for yet; writes land in the order asked, so the last one asked is the one to wait
        for)."""
        if self._filed.get(ep.id) is not ep:
            self._save_soon(ep)
        pending = self._writes.get(ep.id)
        if pending is not None:
            await pending

    async def _forget(self, ep: Endpoint, release_address: bool = False) -> None:
        """Drop `ep` from the books and its state file (on the state thread, after the
        writes asked before). With `release_address` (a delete, once the veth and the
        datapath entries are gone) its address goes back in the same job first: one
        thread hop per pod stop where there were two."""
        self._endpoints.pop(ep.id, None)
        self._filed.pop(ep.id, None)
        self._netns_keys.pop(ep.id, None)
        self._netns_files.pop(ep.id, None)
        self._installed.pop(ep.id, None)
        state_file = self.dir / f"{ep.id}.json"

        def forget() -> None:
            if release_address:
                self._release_address(ep)
            state_file.unlink(missing_ok=True)

        await asyncio.get_running_loop().run_in_executor(self._io, forget)

    def _free_id(self) -> int:
        if self._stray_ids is None:
            # state files no endpoint here owns (unreadable ones restore left alone): their
            # ids stay unused. Read once: every later file is one of our endpoints'
            self._stray_ids = {int(p.stem) for p in self.dir.glob("*.json")
                               if p.stem.isdigit()} - set(self._endpoints) - set(
                self._creating) - set(self._deleting)
        for candidate in range(MIN_ENDPOINT_ID, MAX_ENDPOINT_ID + 1):
            # membership tests, not a union: no set of every id built per create
            if candidate not in self._endpoints and candidate not in self._creating and \
                    candidate not in self._deleting and candidate not in self._stray_ids:
                return candidate
        raise PyliumError(f"no free endpoint id (all {MAX_ENDPOINT_ID} in use)")

    # lifecycle ----------------------------------------------------------------------------
    async def create(self, name: str, namespace: str, labels: dict[str, str] | None,
                     netns: str, container_id: str = "", pod_ifname: str = "eth0") -> Endpoint:
        """A new endpoint (see `create_endpoint`)."""
        ep, _created = await self.create_endpoint(name, namespace, labels, netns,
                                                  container_id=container_id,
                                                  pod_ifname=pod_ifname)
        return ep

    async def create_endpoint(self, name: str, namespace: str, labels: dict[str, str] | None,
                              netns: str, container_id: str = "", pod_ifname: str = "eth0",
                              ) -> tuple[Endpoint, bool]:
        """Wire `netns` as an endpoint; returns it and whether it is new.

        With a `container_id` (a CNI ADD) the operation is idempotent: asking again for the
        same container returns the endpoint made the first time (a runtime retrying an ADD
        whose answer it missed gets the same IP, nothing leaks: Cilium #9913). Creates and
        deletes of one container run in arrival order, so a DEL sent after an ADD the
        runtime gave up on deletes what that ADD made; the late ADD then answers 409.

        The manager's lock covers only the bookkeeping (clash checks, claiming an id, name
        and netns); the slow kernel and store work — veth, address, identity, programs —
        runs outside it, so the pods of a node starting together are wired side by side."""
        validate_name("name", name)
        validate_name("namespace", namespace)
        labels = validate_labels(labels)
        pod_ifname = validate_ifname(pod_ifname)
        if container_id:
            validate_container_id(container_id)
        if self.label_resolver is not None:
            resolved = validate_labels(await self.label_resolver(namespace, name))
            labels = dict(sorted({**resolved, **labels}.items()))
        if not isinstance(netns, str) or not netns:
            raise UserError("netns: give the pod's network namespace (a name under "
                            "/run/netns or an absolute path)")
        problem = plumbing.netns_problem(netns)
        if problem:
            raise UserError(f"netns: {netns} {problem}")
        self._begin(container_id)
        try:
            async with self._attachment(container_id or f"{namespace}/{name}"):
                async with self._lock:
                    if container_id:
                        existing = self.find_container(container_id)
                        if existing is not None:
                            return self._same_attachment(existing, netns, pod_ifname), False
                    key, path = plumbing.netns_key(netns), _netns_file(netns)
                    replaced = await self._make_room(name, namespace, netns, container_id, key,
                                                     path)
                    ep_id = self._free_id()
                    self._creating[ep_id] = (namespace, name, path, key)
                try:
                    ep = await self._wire(ep_id, name, namespace, labels, netns, container_id,
                                          pod_ifname)
                finally:
                    del self._creating[ep_id]
                # this endpoint, and the endpoints whose selectors select its identity if
                # that is new (the policy side queued those in pending_identities)
                await self.regenerate_changed({ep.id}, f"endpoint {ep.id} created")
                current = self._endpoints.get(ep.id)
                if current is not None:
                    await self._written(current)  # restorable before the answer
                    current = self._endpoints.get(ep.id)
                if current is None or self._deletes_waiting.get(container_id) or \
                        (current.created_at, current.name) != (ep.created_at, ep.name):
                    # a DEL of this container came in meanwhile: it goes next and removes
                    # what this ADD made
                    raise Conflict(f"endpoint {ep.id} was deleted while it was being created")
        finally:
            self._end(container_id)
        ep = current
        if self.on_deleted is not None:
            for old in replaced:
                self.on_deleted(old)
        if self.on_created is not None:
            self.on_created(ep)
        self._trimmer.touch()
        return ep, True

    @contextlib.asynccontextmanager
    async def _attachment(self, key: str):
        """Hold the lock of one attachment (FIFO: arrival order); dropped when unused."""
        lock = self._attachment_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._attachment_locks.pop(key, None)

    def _begin(self, container_id: str) -> None:
        """Count a pending create of `container_id` (GC leaves its address alone)."""
        if container_id:
            self._pending[container_id] = self._pending.get(container_id, 0) + 1

    def _end(self, container_id: str) -> None:
        if not container_id:
            return
        self._pending[container_id] -= 1
        if not self._pending[container_id]:
            del self._pending[container_id]

    @staticmethod
    def _same_attachment(ep: Endpoint, netns: str, pod_ifname: str) -> Endpoint:
        if ep.pod_ifname != pod_ifname or not plumbing.same_netns(ep.netns, netns):
            raise Conflict(f"container {ep.container_id} already has endpoint {ep.id} "
                           f"({ep.pod_ifname} in {ep.netns}); one interface per container")
        return ep

    async def _make_room(self, name: str, namespace: str, netns: str, container_id: str,
                         key: tuple[int, int] | None, path: str) -> list[Endpoint]:
        """Refuse a create that clashes with an existing endpoint by name or netns. A CNI
        endpoint whose pod netns is gone (its sandbox died without a DEL) makes way; the
        ones replaced are returned. A clash with a create or delete still under way is a
        409 (try again). Namespaces are compared by inode (`key`) and by the file that
        names them (`path`, `_netns_file`), each worked out once per endpoint."""
        for other_ns, other_name, other_path, other_key in list(self._creating.values()) + [
                (ep.namespace, ep.name, _netns_file(ep.netns), self._netns_keys[ep.id]
                 if ep.id in self._netns_keys else plumbing.netns_key(ep.netns))
                for ep in self._deleting.values()]:  # (not cached: the id is being freed)
            same = (other_path == path if other_key is None or key is None
                    else other_key == key)
            if (other_ns, other_name) == (namespace, name) or same:
                raise Conflict(f"endpoint {namespace}/{name} or netns {netns} is being "
                               "created or deleted; try again")
        replaced = []
        for ep in list(self._endpoints.values()):
            clash_name = (ep.namespace, ep.name) == (namespace, name)
            clash_netns = self._file_of(ep) == path or (
                key is not None and self._netns_key(ep) == key)
            if not (clash_name or clash_netns):
                continue
            if container_id and ep.container_id and not plumbing.netns_exists(ep.netns):
                log.warning("endpoint %d of container %s: its netns %s is gone, replacing it",
                            ep.id, ep.container_id, ep.netns)
                await self._delete_locked(ep)
                replaced.append(ep)
                continue
            if clash_name:
                if container_id and ep.container_id:
                    raise Conflict(f"endpoint {namespace}/{name} already exists for container "
                                   f"{ep.container_id} (id {ep.id}); try again once it is "
                                   "deleted")
                raise UserError(f"endpoint {namespace}/{name} already exists (id {ep.id})")
            raise UserError(f"netns: {netns} already belongs to endpoint "
                            f"{ep.namespace}/{ep.name}")
        return replaced

    def _file_of(self, ep: Endpoint) -> str:
        """`_netns_file` of the endpoint's netns, computed once per endpoint."""
        known = self._netns_files.get(ep.id)
        if known is None or known[0] != ep.netns:
            known = self._netns_files[ep.id] = (ep.netns, _netns_file(ep.netns))
        return known[1]

    def _netns_key(self, ep: Endpoint) -> tuple[int, int] | None:
        if ep.id not in self._netns_keys:
            self._netns_keys[ep.id] = plumbing.netns_key(ep.netns)
        return self._netns_keys[ep.id]

    async def _wire(self, ep_id: int, name: str, namespace: str, labels: dict[str, str],
                    netns: str, container_id: str, pod_ifname: str) -> Endpoint:
        """veth, address, identity and datapath for a new endpoint (outside the lock, with
        `ep_id`, the name and the netns claimed); everything done is undone if a step
        fails. The veth and address (a netlink thread), the identity (the KV store) and an
        empty policy map in the endpoint's slot (its RCU grace period; the first
        regeneration fills the map in place) are made side by side. The endpoint is
        current once wired and published (`_publish`: with its first policy and its state
        file, in one thread job, when the datapath can)."""
        owner = (container_owner(container_id) if container_id
                 else f"endpoint:{namespace}/{name}")
        ifname = host_ifname(namespace, name, container_id)
        jobs: dict[str, Any] = {"links": asyncio.ensure_future(
            self._address_and_links(owner, ifname, netns, pod_ifname))}
        if self.identities is not None:
            jobs["identity"] = asyncio.ensure_future(
                self._allocate_identity(namespace, name, labels))
        prepare = getattr(self.datapath, "prepare_policy", None)
        prepared = asyncio.ensure_future(prepare(ep_id)) if prepare is not None else None
        done = dict(zip(jobs, await asyncio.gather(*jobs.values(), return_exceptions=True),
                        strict=True))
        undo: list[Callable[[], Any]] = []
        if not isinstance(done["links"], BaseException):
            address, links = done["links"]
            undo += [lambda: self.ipam.release(address),
                     lambda: plumbing.unwire_endpoint(ifname, address)]
        if "identity" in done and not isinstance(done["identity"], BaseException):
            undo.append(lambda: self.identities.release(done["identity"]))
        if prepared is not None:
            undo.append(lambda: self._unprepare_policy(ep_id, prepared))
        try:
            for outcome in done.values():
                if isinstance(outcome, BaseException):
                    raise outcome
            if prepared is not None:
                await self._policy_slot_ready(ep_id, prepared)
            ep = Endpoint(id=ep_id, name=name, namespace=namespace, labels=labels,
                          netns=netns, ipv4=address, ifname=ifname,
                          ifindex=links.host.ifindex, mac=links.host.mac,
                          pod_mac=links.pod.mac, container_id=container_id,
                          pod_ifname=pod_ifname, identity=done.get("identity", 0))
            publish = getattr(self.datapath, "publish", None)
            if publish is not None:
                ep = await self._publish(ep, publish, undo)
            else:
                if self.datapath is not None:
                    await self.datapath.attach(ep)
                    undo.append(lambda: self.datapath.detach(ep))
                undo.append(lambda: self._forget(ep))
                self._endpoints[ep.id] = ep
        except BaseException:
            for step in reversed(undo):
                try:
                    result = step()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("undoing a failed endpoint create")
            raise
        log.info("endpoint %d %s/%s created: %s on %s, identity %d%s", ep.id, namespace, name,
                 address, ifname, ep.identity,
                 f", container {container_id}" if container_id else "")
        return ep

    async def _publish(self, ep: Endpoint, publish: Callable[..., Any],
                       undo: list[Callable[[], Any]]) -> Endpoint:
        """Publish a wired endpoint, fill its first policy and write its state file in one
        job of a datapath thread (`DatapathAdapter.publish`): one thread hop per pod start
        where there were three (publish, first policy, state file), each a scheduling
        delay on a node starting many pods. The state file exists before the create
        answers (restore needs only what the veth and address are; it regenerates every
        endpoint's policy itself). The create's regeneration pass then finds the policy
        loaded and the file current, unless the policy changed meanwhile."""
        policy = None
        if self.policy is not None:
            try:
                policy = await self.policy.compute(ep)
            except Exception:
                policy = None  # the regeneration pass computes it again and reports why
        ready = ep if policy is None else _ready_under(ep, policy)
        filed: list[Endpoint] = []

        def then(filled: bool) -> None:  # on the datapath thread
            self._state_writer(ready if filled else ep)()
            filed.append(ready if filled else ep)

        undo.append(lambda: self.datapath.detach(ep))
        undo.append(lambda: self._forget(ep))
        failed = await publish(ep, policy, then)
        current = filed[0]
        if policy is not None and failed is None:
            self._installed[ep.id] = policy
        elif failed is not None:
            log.warning("endpoint %d: its first policy did not load (%s); regenerating",
                        ep.id, failed)
        self._endpoints[ep.id] = current
        self._filed[ep.id] = current
        return current

    def _state_writer(self, ep: Endpoint) -> Callable[[], None]:
        """A function that writes `ep`'s state file (atomically: temp file, rename), for
        the thread that writes it: the encoding happens there too, not on the event loop
        (`ep` is immutable), and by the C encoder (no `indent`: an indented dump takes
        json's pure-Python path, ~10x the CPU)."""
        path = self.dir / f"{ep.id}.json"

        def write() -> None:
            text = json.dumps(endpoint_to_json(ep), sort_keys=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

        return write

    async def _policy_slot_ready(self, ep_id: int, prepared: asyncio.Future) -> None:
        """Until the prepared policy map is in the endpoint's slot: the update lands at
        once, then sleeps through an RCU grace period that nothing here needs to wait for
        (the slot was empty or held a dead endpoint's map), so the slot is looked at
        instead; a failed prepare raises."""
        in_place = getattr(self.datapath, "policy_in_place", None)
        while not prepared.done():
            if in_place is not None and in_place(ep_id):
                return
            await asyncio.sleep(0.0005)
        prepared.result()

    async def _unprepare_policy(self, ep_id: int, prepared: asyncio.Future) -> None:
        """Take back the policy map `prepare_policy` put in a failed create's slot."""
        try:
            made = await prepared
        except Exception:
            return  # it made nothing
        if made:
            await self.datapath.release_policy(ep_id)

    async def _address_and_links(self, owner: str, ifname: str, netns: str,
                                 pod_ifname: str) -> tuple[str, plumbing.EndpointLinks]:
        """An address for `owner` (the IPAM thread) and the veth with it (a netlink
        thread), side by side: the veth and its programs need no address, so the netlink
        thread makes them while the address is being allocated and waits for it only to
        configure the pod's end (at a burst's start that wait was ~15-30 ms the serial
        netlink thread sat idle). The address goes back if the veth cannot be made."""
        allocation = self._address_for(owner)
        handoff: concurrent.futures.Future = concurrent.futures.Future()

        def relay(done: asyncio.Future) -> None:  # on the loop, to the netlink thread
            if done.cancelled():
                handoff.cancel()
            elif done.exception() is not None:
                handoff.set_exception(done.exception())
            else:
                handoff.set_result(done.result())

        allocation.add_done_callback(relay)

        def address() -> str:  # on the netlink thread, once the veth is made
            try:
                return handoff.result(timeout=ADDRESS_WAIT_S)
            except TimeoutError:
                raise PyliumError(f"no address for {owner} within {ADDRESS_WAIT_S:.0f} s "
                                  "(IPAM busy)") from None

        try:
            links = await asyncio.get_running_loop().run_in_executor(
                self._netlink, self._plumb, ifname, netns, address, pod_ifname)
        except asyncio.CancelledError:
            # a thread still waiting for the address then removes its veth (one past that
            # point still makes the veth, with its address)
            allocation.cancel()
            raise
        except Exception:
            with contextlib.suppress(Exception):  # (an allocation that failed: none)
                self.ipam.release(await allocation)
            raise
        return await allocation, links

    def _address_for(self, owner: str) -> asyncio.Future:
        """`owner`'s address, allocated with those of the other creates asking meanwhile
        (one state file write for all of them)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._wanted_addresses.append((owner, future))
        if not self._allocating:
            self._allocating = True
            loop.call_soon(self._allocate_wanted)
        return future

    def _allocate_wanted(self) -> None:
        """Allocate every address asked for so far in one job of the IPAM thread; asks
        arriving meanwhile wait for the next job, started once this one is done."""
        batch, self._wanted_addresses = self._wanted_addresses, []
        if not batch:
            self._allocating = False
            return
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._ipam_thread, self.ipam.allocate_many,
                                       [owner for owner, _future in batch])
        except RuntimeError as exc:  # the manager is closing: no thread to do it
            for _owner, future in batch:
                if not future.done():
                    future.set_exception(PyliumError(f"no address allocated: {exc}"))
            self._allocating = False
            return

        def done(job: asyncio.Future) -> None:
            failed = (PyliumError("address allocation was cancelled") if job.cancelled()
                      else job.exception())
            results = [failed] * len(batch) if failed is not None else job.result()
            for (_owner, future), result in zip(batch, results, strict=True):
                if future.cancelled():
                    if isinstance(result, str):  # nobody will use it: give it back
                        self._ipam_thread.submit(self.ipam.release, result)
                elif isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            self._allocate_wanted()

        job.add_done_callback(done)

    def _plumb(self, ifname: str, netns: str, address: Callable[[], str],
               pod_ifname: str) -> plumbing.EndpointLinks:
        """The veth pair (a thread's work): a stale host veth of this endpoint's name, left
        by an agent that died half way through creating it, is removed first."""
        # the datapath's programs go on the host end before the pod end comes up
        hook = getattr(self.datapath, "attach_programs", None)
        options = {"pod_ifname": pod_ifname, "mtu": self.mtu,
                   **({"on_host_link": hook} if hook is not None else {})}
        gateway = str(self.ipam.gateway)
        try:
            return plumbing.wire_endpoint(ifname, netns, address, gateway, **options)
        except NetlinkError as exc:
            # the name is taken (the kernel says so; no look before every create): a host
            # veth of this endpoint's name can only be one left behind
            if exc.code != errno.EEXIST or plumbing.link_info(ifname) is None:
                raise
        log.warning("removing stale %s left by an unfinished create", ifname)
        plumbing.unwire_endpoint(ifname)
        return plumbing.wire_endpoint(ifname, netns, address, gateway, **options)

    async def delete(self, ref: str | int) -> Endpoint:
        async with self._lock:
            ep = self.get(ref)
            await self._delete_locked(ep)
        await self._after_delete(ep)
        return ep

    async def delete_container(self, container_id: str, pod_ifname: str = "") -> Endpoint | None:
        """Delete the endpoint of a container (a CNI DEL): idempotent, None if there was
        none. The endpoint leaves the books under the lock; its veth, address, maps and
        identity are torn down outside it (its id, name and netns stay claimed until then)."""
        validate_container_id(container_id)
        waiting = self._deletes_waiting
        waiting[container_id] = waiting.get(container_id, 0) + 1
        queued = True
        try:
            async with self._attachment(container_id):
                queued = False
                self._unwait(container_id)
                ep = await self._delete_container(container_id, pod_ifname)
        finally:
            if queued:
                self._unwait(container_id)
        if ep is not None:
            await self._after_delete(ep)
        return ep

    def _unwait(self, container_id: str) -> None:
        self._deletes_waiting[container_id] -= 1
        if not self._deletes_waiting[container_id]:
            del self._deletes_waiting[container_id]

    async def _delete_container(self, container_id: str, pod_ifname: str) -> Endpoint | None:
        async with self._lock:
            ep = self.find_container(container_id)
            if ep is not None and pod_ifname and ep.pod_ifname != pod_ifname:
                ep = None  # another attachment of the container: not ours to delete
            if ep is not None:
                self._endpoints.pop(ep.id, None)
                self._installed.pop(ep.id, None)
                self._deleting[ep.id] = ep
        if ep is None:
            # an address a create took before it failed half way, if any
            leaked = await asyncio.to_thread(self.ipam.release_owner,
                                             container_owner(container_id))
            if leaked:
                log.info("released %s held by container %s", leaked, container_id)
            return None
        try:
            await self._teardown(ep)
        finally:
            del self._deleting[ep.id]
        return ep

    async def _delete_locked(self, ep: Endpoint) -> None:
        """Delete `ep` entirely while the caller holds the lock."""
        self._endpoints.pop(ep.id, None)
        self._installed.pop(ep.id, None)
        await self._teardown(ep)

    async def _teardown(self, ep: Endpoint) -> None:
        """Undo everything `_wire` made for an endpoint already out of the books. The
        endpoint is unpublished from the datapath first; its policy map and conntrack
        entries then go while its veth is removed (both wait for RCU grace periods in the
        kernel), its address once both are done."""
        loop = asyncio.get_running_loop()
        unpublish = getattr(self.datapath, "unpublish", None)
        datapath_done: Any = None
        if unpublish is not None:
            try:
                await unpublish(ep)
            except Exception:
                log.exception("detaching endpoint %d from the datapath failed", ep.id)
            datapath_done = asyncio.ensure_future(self.datapath.forget(ep))
        elif self.datapath is not None:
            try:
                await self.datapath.detach(ep)
            except Exception:
                log.exception("detaching endpoint %d from the datapath failed", ep.id)
        try:
            await loop.run_in_executor(self._unwiring, plumbing.unwire_endpoint, ep.ifname,
                                       ep.ipv4)
        finally:
            if datapath_done is not None:
                try:
                    await datapath_done
                except Exception:
                    log.exception("forgetting endpoint %d in the datapath failed", ep.id)
        await self._forget(ep, release_address=True)
        if self.identities is not None and ep.identity:
            try:
                await self.identities.release(ep.identity)
            except Exception:
                log.exception("releasing identity %d failed", ep.identity)
        log.info("endpoint %d %s/%s deleted", ep.id, ep.namespace, ep.name)

    def _release_address(self, ep: Endpoint) -> None:
        self.ipam.release(ep.ipv4)
        if ep.container_id:
            self.ipam.release_owner(ep.ipam_owner)

    async def _after_delete(self, ep: Endpoint) -> None:
        await self.regenerate_changed(set(), f"endpoint {ep.id} deleted")
        if self.on_deleted is not None:
            self.on_deleted(ep)
        self._trimmer.touch()

    async def gc(self, valid: set[tuple[str, str]]) -> dict[str, list]:
        """CNI GC: delete the endpoints of containers whose (container id, ifname) is not in
        `valid` and release addresses held by containers without an endpoint. Endpoints
        made without a container id (the lab's) and creates still running are kept."""
        async with self._lock:
            stale = [ep for ep in self._endpoints.values() if ep.container_id
                     and (ep.container_id, ep.pod_ifname) not in valid
                     and ep.container_id not in self._pending]
            for ep in stale:
                await self._delete_locked(ep)
            held = {ep.ipam_owner for ep in self._endpoints.values()} | {
                ep.ipam_owner for ep in self._deleting.values()}
            pending = {container_owner(cid) for cid in self._pending}
            released = []
            for address, owner in self.ipam.allocated().items():
                if owner.startswith("container:") and owner not in held | pending:
                    self.ipam.release(address)
                    released.append(address)
        for ep in stale:
            await self._after_delete(ep)
        if stale or released:
            log.info("GC: deleted endpoints %s, released addresses %s",
                     [ep.id for ep in stale], released)
        return {"deleted": [ep.id for ep in stale], "released": sorted(released)}

    async def check(self, container_id: str) -> list[str]:
        """What is wrong with a container's endpoint (CNI CHECK): [] when its veth, netns,
        pod interface and address are all in place."""
        ep = self.find_container(container_id)
        if ep is None:
            return [f"container {container_id} has no endpoint"]
        problems = []
        link = await asyncio.to_thread(plumbing.link_info, ep.ifname)
        if link is None or link.ifindex != ep.ifindex:
            problems.append(f"host veth {ep.ifname} is missing or was replaced")
        if not plumbing.netns_exists(ep.netns):
            return [*problems, f"netns {ep.netns} is gone"]
        pod = await asyncio.to_thread(plumbing.link_info, ep.pod_ifname, ep.netns)
        if pod is None or not pod.up:
            problems.append(f"{ep.pod_ifname} in {ep.netns} is missing or down")
        elif pod.mac != ep.pod_mac:
            problems.append(f"{ep.pod_ifname} has MAC {pod.mac}, expected {ep.pod_mac}")
        else:
            addresses = await asyncio.to_thread(plumbing.addresses, ep.pod_ifname, ep.netns)
            if f"{ep.ipv4}/32" not in addresses:
                problems.append(f"{ep.pod_ifname} lacks {ep.ipv4}/32")
        if ep.state == NOT_READY:
            problems.append(f"endpoint {ep.id} is not ready: {ep.error}")
        return problems

    async def set_labels(self, ref: str | int, labels: dict[str, str]) -> Endpoint:
        labels = validate_labels(labels)
        async with self._lock:
            ep = self.get(ref)
            old_identity = ep.identity
            ep = await self._resolve_identity(attrs.evolve(ep, labels=labels))
            await self._save(ep)
            if self.datapath is not None:
                await self.datapath.attach(ep)  # re-publishes the endpoint's identity
            if self.identities is not None and old_identity and old_identity != ep.identity:
                await self.identities.release(old_identity)
        await self.regenerate_changed({ep.id}, f"endpoint {ep.id} labels changed")
        return self._endpoints[ep.id]

    async def _resolve_identity(self, ep: Endpoint) -> Endpoint:
        if self.identities is None:
            return ep
        return attrs.evolve(ep, identity=await self._allocate_identity(ep.namespace, ep.name,
                                                                       ep.labels))

    async def _allocate_identity(self, namespace: str, name: str,
                                 labels: dict[str, str]) -> int:
        """The identity of an endpoint with these labels (one reference more to it)."""
        try:
            identity = await self.identities.allocate(identity_labels(namespace, labels))
        except KVStoreUnavailable as exc:
            # only a label set no endpoint here has needs the store: say so, not just "down"
            raise KVStoreUnavailable(f"endpoint {namespace}/{name} not created: its "
                                     f"labels need a new identity and {exc}") from None
        return int(identity)

    # regeneration -------------------------------------------------------------------------
    async def regenerate_all(self, reason: str) -> dict[str, Any]:
        """Recompute and load every endpoint's policy. One failing endpoint does not stop the
        others; each failure leaves that endpoint's previous policy in place."""
        return await self._regenerate_where(lambda ep: True, reason)

    async def regenerate_identities(self, identities: set[int], reason: str) -> dict[str, Any]:
        """Regenerate only the endpoints whose identity is in `identities`."""
        return await self._regenerate_where(lambda ep: ep.identity in identities, reason)

    async def regenerate_changed(self, endpoint_ids: set[int], reason: str) -> dict[str, Any]:
        """Regenerate the endpoints `endpoint_ids` and those of every identity queued in
        `pending_identities` (taken under the lock, so whichever pass runs first does the
        queued work and a create returns only once its peers' policies know it)."""
        queued: set[int] = set()
        wanted: set[int] = set()
        # endpoints asked for by creates waiting for the lock are taken along too: pods
        # started together share one pass (whose datapath work runs side by side)
        self._regen_wanted |= endpoint_ids
        return await self._regenerate_where(
            lambda ep: ep.id in wanted or ep.identity in queued, reason, drain=queued,
            wanted=wanted)

    async def regenerate_pending(self, reason: str) -> dict[str, Any]:
        """Regenerate the endpoints of the identities queued in `pending_identities`."""
        return await self.regenerate_changed(set(), reason)

    async def _regenerate_where(self, selected, reason: str, drain: set[int] | None = None,
                                wanted: set[int] | None = None) -> dict[str, Any]:
        """`last_regeneration` reports how many endpoints this pass regenerated (not how
        many exist) and which of them failed. With `drain`, the queued identities are moved
        into it first, once the lock is held (with `wanted`, the endpoints creates asked
        for). The chosen endpoints are regenerated side by side: each one's datapath swap
        waits for an RCU grace period in the kernel, and concurrent waits share periods."""
        async with self._lock:
            if drain is not None:
                drain.update(self.pending_identities)
                self.pending_identities.clear()
            if wanted is not None:
                wanted.update(self._regen_wanted)
                self._regen_wanted.clear()
            chosen = [ep for ep in self._endpoints.values() if selected(ep)]
            errors = await asyncio.gather(*(self._regenerate(ep) for ep in chosen),
                                          return_exceptions=True)  # all done before unlocking
            for error in errors:
                if isinstance(error, BaseException):
                    raise error
            failed = {ep.id: error for ep, error in zip(chosen, errors, strict=True) if error}
            self.last_regeneration = {"reason": reason, "endpoints": len(chosen),
                                      "failed": failed}
            return self.last_regeneration

    async def _regenerate(self, ep: Endpoint) -> str:
        if self.policy is None or self.datapath is None:
            if ep.state != READY:
                self._save_soon(attrs.evolve(ep, state=READY, error=""))
            return ""
        self._endpoints[ep.id] = attrs.evolve(ep, state=REGENERATING)
        try:
            policy = await self.policy.compute(ep)
            installed = self._installed.get(ep.id)
            # the same policy as the one in the datapath (map entries, revision and L7
            # grants): nothing to load. Pod churn regenerates every endpoint; without this
            # each create would rebuild every endpoint's map (Cilium skips unchanged ones too)
            if installed is None or installed != policy or \
                    getattr(installed, "l7", None) != getattr(policy, "l7", None):
                await self.datapath.update_policy(ep, policy)
                self._installed[ep.id] = policy
        except Exception as exc:
            error = f"policy regeneration failed, previous policy kept: {exc}"
            log.error("endpoint %d %s/%s: %s", ep.id, ep.namespace, ep.name, error)
            self._save_soon(attrs.evolve(ep, state=NOT_READY, error=error))
            return error
        done = _ready_under(ep, policy)
        if done == ep:
            self._endpoints[ep.id] = ep  # unchanged: no state file to rewrite
        else:
            # written on the state thread after the pass (a create waits for its own)
            self._save_soon(done)
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
                self.ipam.allocate_specific(ep.ipv4, ep.ipam_owner)
                try:
                    ep = await self._resolve_identity(ep)
                    await self._save(ep)
                    if self.datapath is not None:
                        await self.datapath.attach(ep)
                except Exception as exc:
                    error = f"restore failed: {exc}"
                    log.error("endpoint %d: %s", ep.id, error)
                    ep = attrs.evolve(ep, state=NOT_READY, error=error)
                await self._save(ep)
                adopted.append(ep.id)
            # addresses held for endpoints that no longer have a state file leak otherwise
            owners = {e.ipam_owner for e in self._endpoints.values()}
            for address, owner in self.ipam.allocated().items():
                if owner.startswith(("endpoint:", "container:")) and owner not in owners:
                    self.ipam.release(address)
        if adopted:
            log.info("restored endpoints %s", adopted)
        return {"adopted": adopted, "dropped": dropped}

    async def close(self) -> None:
        """Endpoints outlive the agent (that is the point of restore): only the state
        thread stops, once the writes asked of it are done."""
        self._trimmer.cancel()
        await asyncio.to_thread(self._io.shutdown, True)
        self._netlink.shutdown(wait=False)
        self._unwiring.shutdown(wait=False)
        self._ipam_thread.shutdown(wait=False)
