"""`Datapath`: the one object the rest of pylium uses to drive the endpoint BPF programs.

Maps are pinned under `bpffs_root` and adopted on every `open()`: an agent restart keeps
endpoints, policies, conntrack and counters. Programs are tc clsact filters on each
endpoint's host-side veth, which the kernel keeps when the agent dies."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from pylium.datapath import libbpf, tc, testrun
from pylium.datapath.bpffs import ensure_bpffs
from pylium.datapath.compile import bpf_source_dir
from pylium.datapath.hwaddr import interface_mac
from pylium.datapath.libbpf import DatapathError, lib
from pylium.datapath.loader import LoadedObject, load_object
from pylium.datapath.maps.base import BpfMap
from pylium.datapath.maps.conntrack import (
    CT_DIR_SERVICE,
    CT_F_CLOSING,
    CT_F_SEEN_REPLY,
    CtEntry,
    CtKey,
)
from pylium.datapath.maps.endpoints import (
    EndpointInfoValue,
    EndpointKey,
    mac_bytes,
    mac_str,
)
from pylium.datapath.maps.events import PROTOCOLS
from pylium.datapath.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pylium.datapath.maps.metrics import MetricsKey, MetricsValue, U32Key, U64Value, reason_name
from pylium.datapath.maps.policy import (
    POLICY_ENTRIES_MAX,
    POLICY_F_DENY,
    PolicyMapEntry,
    PolicyMapKey,
    encode_entry,
    encode_meta,
    entries_needed,
)
from pylium.datapath.packet import SkBuff
from pylium.datapath.proxy import (
    install_proxy_routing,
    prepare_endpoint_veth,
    remove_proxy_routing,
)
from pylium.datapath.testrun import decode_result
from pylium.errors import UserError
from pylium.policy.mapstate import (
    PROTOCOL_NAMES,
    Direction,
    EndpointPolicy,
)

log = logging.getLogger(__name__)

OBJECT_SOURCE = "bpf_lxc.c"
PROGRAMS = ("from_container", "to_container", "to_container_peer", "from_netdev")
#: from_container's local delivery: the destination's side runs in to_container_peer, which
#: it tail-calls through the pinned `lxc_progs` (bpf_lxc.c), filled at every load
LXC_SLOT_TO_PEER = 0
#: slots of the pinned `routing_progs` (bpf/lib/routing.h): the routing mode's program for
#: destinations behind a tunnel endpoint, and the encryption's steering, tail-called first
ROUTING_SLOT_REMOTE = 0
ROUTING_SLOT_ENCRYPT = 1
PINNED_MAPS = ("endpoints", "ipcache", "policy", "conntrack", "metrics", "events", "events_lost",
               "routing_progs", "lb4_services", "lb4_backends", "lb4_reverse_nat", "lb4_maglev",
               "lb4_affinity", "lb4_sock_revnat", "lxc_progs")
#: the hash maps whose fill ratio Cilium reports as map pressure
PRESSURE_MAPS = ("endpoints", "ipcache", "conntrack", "policy")
#: conntrack map size: the default (bpf/lib/conntrack.h) and the range a config may ask for
CT_MAX_DEFAULT, CT_MAX_MIN, CT_MAX_MAX = 65536, 1024, 1 << 24
CT_DIRECTIONS = {0: "ingress", 1: "egress", 2: "service", 3: "nodeport", 4: "nodeport-snat"}
MAX_IDENTITY = 0xFFFFFFFE
ENDPOINT_IDENTITY_LIMIT = 1 << 24
#: locks guarding the policy outer map's slots (see `Datapath._policy_locks`)
POLICY_LOCK_STRIPES = 256


@attrs.frozen
class EndpointInfo:
    """One endpoint as the datapath needs it. `ifindex` is the host-side veth in the netns
    the agent (and this Datapath) runs in."""

    ep_id: int
    ipv4: str
    ifindex: int
    ep_mac: str
    host_mac: str
    identity: int


def _errno(exc: DatapathError) -> int | None:
    """The errno a libbpf failure names ("... (errno 7)"), if any."""
    found = re.search(r"\(errno (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


class MapFull(DatapathError):
    """A BPF map cannot take what was asked; nothing was changed (fail closed)."""


def _check_identity(identity: int, what: str) -> None:
    if not 0 <= identity <= MAX_IDENTITY:
        raise UserError(f"{what}: identity {identity} outside 0..{MAX_IDENTITY}")


def _check_ep_id(ep_id: int) -> None:
    if not 1 <= ep_id <= 0xFFFF:
        raise UserError(f"ep_id: {ep_id} outside 1..65535")


class Datapath:
    """The endpoint datapath of one node, pinned under `bpffs_root`. Use it from the netns
    that holds the endpoints' host-side veths (the node netns the agent runs in); every
    method is thread-safe. Lifetimes: `ct_timeouts` = (tcp, non_tcp, syn, fin) seconds."""

    def __init__(self, bpffs_root: Path, *, ct_timeouts: tuple[int, ...] = (21600, 60, 60, 10),
                 cache_dir: Path | None = None, policy_capacity: int = POLICY_ENTRIES_MAX,
                 ct_max: int = CT_MAX_DEFAULT):
        self.root = Path(bpffs_root)
        #: entries an endpoint's policy map holds (meta entry included): a policy that
        #: needs more is refused whole and the previous one stays (tests use a small one)
        self.policy_capacity = min(int(policy_capacity), POLICY_ENTRIES_MAX)
        #: refusals because a map was full, by map name (the `pylium_bpf_map_full` metric)
        self.map_full: dict[str, int] = {}
        self.ct_timeouts = tuple(int(t) for t in ct_timeouts)
        if len(self.ct_timeouts) != 4 or min(self.ct_timeouts) <= 0:
            raise UserError(f"ct_timeouts: expected four positive seconds (tcp, non_tcp, syn, "
                            f"fin), got {ct_timeouts}")
        #: conntrack entries (one map for TCP and the rest; Cilium's bpf-ct-global-*-max)
        self.ct_max = int(ct_max)
        if not CT_MAX_MIN <= self.ct_max <= CT_MAX_MAX:
            raise UserError(f"bpf_ct_global_max: {ct_max} is outside {CT_MAX_MIN}..{CT_MAX_MAX}")
        self.cache_dir = cache_dir
        self._obj: LoadedObject | None = None
        self._lock = threading.RLock()
        #: locks of the slots in the policy outer map (endpoint id modulo their number):
        #: installs and deletes of one endpoint's policy run one at a time, other endpoints'
        #: side by side. Each waits for an RCU grace period in the kernel (map-in-map
        #: updates do, so no program still runs with the old inner map), tens of ms on a
        #: busy node: under `_lock` that wait would stall every other pod's attach and
        #: ipcache write. A fixed set, not one per endpoint: nothing to keep per pod, and
        #: ids are handed out lowest first, so endpoints regenerated together rarely share one
        self._policy_locks = [threading.Lock() for _ in range(POLICY_LOCK_STRIPES)]
        #: endpoint id → fd of the empty policy map `prepare_policy` put in its slot, until
        #: its first policy fills that map in place (see `prepare_policy`)
        self._fresh_policy: dict[int, int] = {}
        #: endpoint id → the id of the map `prepare_policy` put (or is putting) in its slot
        self._fresh_ids: dict[int, int] = {}
        self.prog_fds: dict[str, int] = {}
        self.object_path: Path | None = None
        self._proxy_routing = False  # installed in this netns by this object
        #: ifindex → host-side MAC of the veths this open attached its programs to: the
        #: endpoint manager's restore attaches the endpoints `open()` just re-attached, and
        #: attaching them again would replace each filter a second time for nothing
        self._attached: dict[int, str] = {}
        #: endpoint id → its IPv4, the key in the endpoints map (built by one scan on first
        #: use, kept by attach/detach): finding an endpoint must not cost a walk of every
        #: endpoint. The address string is the endpoint record's own, not a per-pod copy
        self._ep_index: dict[int, str] | None = None
        #: conntrack max_entries and the entries the last `ct_gc` left
        self.ct_capacity: int | None = None
        self.ct_entries = 0

    # -- life cycle -----------------------------------------------------------------

    @property
    def map_defines(self) -> dict[str, int]:
        """Defines that shape pinned maps: every object sharing the pins compiles with them."""
        return {"CT_MAX": self.ct_max}

    @property
    def defines(self) -> dict[str, int]:
        tcp, non_tcp, syn, fin = self.ct_timeouts
        return {"CT_LIFETIME_TCP": tcp, "CT_LIFETIME_NONTCP": non_tcp, "CT_LIFETIME_SYN": syn,
                "CT_LIFETIME_FIN": fin, **self.map_defines}

    def open(self) -> Datapath:
        """Load the programs, creating or adopting the pinned maps, and re-attach the
        programs of every endpoint already in the endpoints map."""
        with self._lock:
            if self._obj is None:
                self._load()
                self._readopt_endpoints()
            return self

    def _resize_conntrack_pin(self) -> None:
        """A pinned conntrack map of another size (bpf_ct_global_max changed) cannot be
        adopted: its pin goes, so the load creates one of the new size. Open connections
        are then tracked anew on their next packet (policy decides again; attached programs
        keep the old map until they are replaced a moment later)."""
        pin = self.root / "conntrack"
        if not pin.exists():
            return
        fd = libbpf.obj_get(str(pin))
        try:
            size = libbpf.map_info(fd).max_entries
        finally:
            libbpf.close(fd)
        if size != self.ct_max:
            log.warning("conntrack map resized from %d to %d entries: tracked connections "
                        "start over", size, self.ct_max)
            pin.unlink()

    def _load(self) -> None:
        with self._lock:
            ensure_bpffs(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "progs").mkdir(exist_ok=True)
            self._resize_conntrack_pin()
            loaded = load_object(bpf_source_dir() / OBJECT_SOURCE, self.defines,
                                 pin_root=self.root, pinned_maps=PINNED_MAPS,
                                 require_pinned=True, cache_dir=self.cache_dir)
            try:
                self._bind_maps(loaded)
                for name in PROGRAMS:
                    self.prog_fds[name] = loaded.program(name)
                    pin = self.root / "progs" / name
                    if pin.exists():
                        pin.unlink()
                    libbpf.obj_pin(self.prog_fds[name], str(pin))
                key = ctypes.c_uint32(LXC_SLOT_TO_PEER)
                value = ctypes.c_uint32(self.prog_fds["to_container_peer"])
                libbpf.check(lib.bpf_map_update_elem(loaded.map("lxc_progs"), ctypes.byref(key),
                                                     ctypes.byref(value), 0),
                             "filling lxc_progs")
            except BaseException:
                loaded.close()
                self.prog_fds.clear()
                raise
            self.object_path = loaded.object_path
            self._obj = loaded

    def load_object(self, source: Path, defines: Mapping[str, object] | None = None
                    ) -> LoadedObject:
        """Compile and load a plugin's object with this datapath's cache, its maps bound to
        the core's pins (endpoints, ipcache, ... shared, not copies). The caller closes it.
        The defines that size shared maps (`map_defines`) are this datapath's, so the
        object's copy of a map definition matches the pinned map it adopts."""
        self._require_open()  # the pins exist: the object adopts them rather than making its own
        return load_object(source, {**(defines or {}), **self.map_defines}, pin_root=self.root,
                           pinned_maps=PINNED_MAPS, cache_dir=self.cache_dir)

    def _bind_maps(self, loaded: LoadedObject) -> None:
        def typed(name, key, value, percpu=False):
            return BpfMap(loaded.map(name), name, key, value, percpu=percpu, owned=False)

        self.endpoints = typed("endpoints", EndpointKey, EndpointInfoValue)
        self._ep_index = None
        self.ipcache = typed("ipcache", IpcacheKey, RemoteEndpointInfo)
        self.policy = typed("policy", U32Key, U32Key)
        self.conntrack = typed("conntrack", CtKey, CtEntry)
        self.metrics = typed("metrics", MetricsKey, MetricsValue, percpu=True)
        self.events_lost_map = typed("events_lost", U32Key, U64Value, percpu=True)
        self.events_fd = loaded.map("events")
        self.routing_progs_fd = loaded.map("routing_progs")

    def _ours(self, value: EndpointInfoValue) -> bool:
        """The interface at the endpoint's ifindex, in this netns, is its host-side veth
        (same MAC): never attach to or detach from another netns' namesake interface."""
        return interface_mac(value.ifindex) == mac_str(value.host_mac)

    def _readopt_endpoints(self) -> None:
        for key, value in list(self.endpoints.items()):
            if not self._ours(value):
                log.warning("endpoint %d (%s): ifindex %d here is not its veth (%s); programs "
                            "not re-attached (is the datapath opened in the node's netns?)",
                            value.ep_id, key.ip, value.ifindex, mac_str(value.host_mac))
                continue
            try:
                self._ensure_proxy_routing()
                self._attach_programs(value.ifindex, mac_str(value.host_mac))
            except DatapathError as exc:
                log.warning("endpoint %d (%s): programs not re-attached: %s", value.ep_id,
                            key.ip, exc)

    def _require_open(self) -> None:
        if self._obj is None:
            raise DatapathError("the datapath is not open (call Datapath.open())")

    def close(self) -> None:
        """Drop our fds; pins and attached programs stay (the datapath keeps running)."""
        with self._lock:
            if self._obj is not None:
                self._obj.close()
            self._obj = None
            self.prog_fds.clear()
            self._attached.clear()  # the next open loads new programs: all attach again
            for ep_id in list(self._fresh_policy):
                libbpf.close(self._fresh_policy.pop(ep_id, None))
            self._fresh_ids.clear()

    def destroy(self) -> None:
        """Detach every endpoint's programs and remove every pin (lab down, tests)."""
        with self._lock:
            if self._obj is None:
                try:
                    self._load()
                except DatapathError as exc:
                    log.warning("destroy: could not open the datapath (%s); removing pins only", exc)
            if self._obj is not None:
                for _key, value in list(self.endpoints.items()):
                    if self._ours(value):
                        self._detach_programs(value.ifindex)
                        self._proxy_routing = True
            if self._proxy_routing:
                remove_proxy_routing()
                self._proxy_routing = False
            self.close()
            for name in (*PINNED_MAPS, *(f"progs/{p}" for p in PROGRAMS)):
                path = self.root / name
                if path.exists():
                    path.unlink()
            for d in (self.root / "progs", self.root):
                try:
                    d.rmdir()
                except OSError:
                    pass

    def set_routing_slot(self, slot: int, prog_fd: int | None) -> None:
        """Fill (or, with None, empty) a routing-mode slot of `routing_progs`: from_container
        tail-calls slot 0 for destinations behind a tunnel endpoint."""
        with self._lock:
            self._require_open()
            key = ctypes.c_uint32(slot)
            if prog_fd is None:
                rc = lib.bpf_map_delete_elem(self.routing_progs_fd, ctypes.byref(key))
                if rc < 0 and libbpf.errno_of(rc) != 2:  # ENOENT: already empty
                    libbpf.check(rc, f"emptying routing slot {slot}")
                return
            value = ctypes.c_uint32(prog_fd)
            libbpf.check(lib.bpf_map_update_elem(self.routing_progs_fd, ctypes.byref(key),
                                                 ctypes.byref(value), 0),
                         f"filling routing slot {slot}")

    def __enter__(self) -> Datapath:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- endpoints ------------------------------------------------------------------

    def _ensure_proxy_routing(self) -> None:
        """The netns holding endpoint veths is the node's: flows the programs send to the L7
        proxy need its policy routing there (never installed by an agent without pods).
        Once per open, not per endpoint: it is a rule dump, a route and three sysctls on a
        helper thread, which every pod's CNI ADD would pay again. Under `_lock`."""
        if not self._proxy_routing:
            install_proxy_routing()
            self._proxy_routing = True

    def attach_programs(self, ifindex: int, host_mac: str) -> None:
        """Both programs on a new endpoint's host-side veth, before its pod end comes up
        and before the endpoint is published (`attach_endpoint` then leaves them as they
        are): until then they drop the pod's packets (no endpoint for its address), so a
        pod never sends past them; one thread hop fewer per pod start."""
        self._require_open()
        self._attach_programs(ifindex, host_mac)

    def _attach_programs(self, ifindex: int, host_mac: str) -> None:
        """tc filters on one veth: needs no lock (the kernel serialises each link's
        qdiscs; the endpoint manager never attaches and detaches one endpoint at once)."""
        self._attached.pop(ifindex, None)
        prepare_endpoint_veth(ifindex)
        tc.attach_both(ifindex, self.prog_fds["from_container"], self.prog_fds["to_container"])
        self._attached[ifindex] = host_mac

    def _detach_programs(self, ifindex: int) -> None:
        self._attached.pop(ifindex, None)
        for point in (tc.INGRESS, tc.EGRESS):
            try:
                tc.detach(ifindex, point)
            except DatapathError as exc:
                log.warning("detaching from ifindex %d: %s", ifindex, exc)

    def _find_endpoint(self, ep_id: int) -> tuple[EndpointKey, EndpointInfoValue] | None:
        """The endpoint's map entry. This object is the map's one writer (the agent), so
        the index is trusted; an indexed key that no longer names the endpoint (written
        behind our back) makes it scan and rebuild instead."""
        if self._ep_index is not None:
            ip = self._ep_index.get(ep_id)
            if ip is None:
                return None
            key = EndpointKey.of(ip)
            value = self.endpoints.lookup(key)
            if value is not None and value.ep_id == ep_id:
                return key, value
        self._ep_index = {}
        found = None
        for key, value in self.endpoints.items():
            self._ep_index[value.ep_id] = key.ip
            if value.ep_id == ep_id:
                found = key, value
        return found

    def attach_endpoint(self, ep: EndpointInfo, mac_seen: str | None = None) -> None:
        """Publish the endpoint in the endpoints map and attach both programs to its
        host-side veth (idempotent: a re-attach replaces the entry; the filters are left as
        they are when this open already attached them to this very veth, else replaced).
        The lock covers the maps only: the tc work on the veth runs outside it, so the pods
        of a node starting together get their programs side by side.

        `mac_seen`: the MAC the kernel reported for `ep.ifindex` in this netns a moment
        ago (the netlink answer that made the veth): checked instead of asking again (a
        socket and an ioctl per pod start). None: asked."""
        _check_ep_id(ep.ep_id)
        if not 0 < ep.identity < ENDPOINT_IDENTITY_LIMIT:
            # it travels in 24 bits of skb->mark to a local destination (Cilium does the same)
            raise UserError(f"endpoint {ep.ep_id}: identity {ep.identity} outside 1..{ENDPOINT_IDENTITY_LIMIT - 1}")
        try:
            key = EndpointKey.of(ep.ipv4)
            value = EndpointInfoValue(ep.ifindex, ep.ep_id, 0, ep.identity,
                                      (ctypes.c_uint8 * 6)(*mac_bytes(ep.ep_mac)),
                                      (ctypes.c_uint8 * 6)(*mac_bytes(ep.host_mac)))
        except ValueError as exc:
            raise UserError(f"endpoint {ep.ep_id}: {exc}") from None
        if ep.ifindex <= 0:
            raise UserError(f"endpoint {ep.ep_id}: ifindex {ep.ifindex} is not an interface")
        found_mac = mac_seen.lower() if mac_seen is not None else interface_mac(ep.ifindex)
        if found_mac != mac_str(value.host_mac):
            raise UserError(
                f"endpoint {ep.ep_id}: host_mac {ep.host_mac} is not the MAC of ifindex "
                f"{ep.ifindex} in this network namespace ({found_mac or 'no such interface'}); "
                "the datapath must run in the node netns that holds the host-side veth")
        with self._lock:
            self._require_open()
            old = self._find_endpoint(ep.ep_id)
            if old is not None and old[0].ip != ep.ipv4:
                self.endpoints.delete(old[0])
                if old[1].ifindex != ep.ifindex and self._ours(old[1]):
                    self._detach_programs(old[1].ifindex)
            self.endpoints.update(key, value)
            if self._ep_index is not None:
                self._ep_index[ep.ep_id] = ep.ipv4
            self._ensure_proxy_routing()
        if self._attached.get(ep.ifindex) != found_mac:
            self._attach_programs(ep.ifindex, found_mac)

    def detach_endpoint(self, ep_id: int) -> bool:
        """Detach the programs, forget the endpoint, its policy and its conntrack entries."""
        found = self.unpublish_endpoint(ep_id)
        self.forget_endpoint(ep_id)
        return found

    def unpublish_endpoint(self, ep_id: int) -> bool:
        """`detach_endpoint`'s first half: the programs off the veth, the endpoint out of
        the endpoints map (its packets now drop); False if it was not there."""
        with self._lock:
            self._require_open()
            found = self._find_endpoint(ep_id)
        # the filters first (outside the lock, like attaching them), then the entries
        if found is not None and self._ours(found[1]):
            self._detach_programs(found[1].ifindex)
        with self._lock:
            if found is not None:
                self.endpoints.delete(found[0])
                if self._ep_index is not None:
                    self._ep_index.pop(ep_id, None)
        return found is not None

    def forget_endpoint(self, ep_id: int) -> None:
        """`detach_endpoint`'s second half, once the endpoint is unpublished: its policy map
        (an RCU grace period) and its conntrack entries."""
        self.release_policy(ep_id)
        # the conntrack walk needs no lock either (the kernel map is safe to walk and
        # delete from concurrently; no other thread writes this endpoint's entries now)
        for key, value in self.conntrack.items_batched():
            if value.ep_id == ep_id:
                self.conntrack.delete(key)

    # -- policy ---------------------------------------------------------------------

    def _policy_slot(self, ep_id: int) -> threading.Lock:
        return self._policy_locks[ep_id % POLICY_LOCK_STRIPES]

    def prepare_policy(self, ep_id: int) -> bool:
        """Give a new endpoint an empty policy map before its first policy is known: one
        without the meta entry, so its programs drop every packet (DROP_NO_CONFIG) until
        then. Putting a map into the outer slot waits for an RCU grace period (every
        map-in-map update does, tens of ms on a busy node); done here, alongside the
        endpoint's veth, that wait is off the path of its first regeneration, which then
        fills this map in place with the meta entry written last (`update_policy`): the
        programs see no policy, then the whole one. Only for an id no endpoint holds: a
        map already in the slot is a dead endpoint's (an agent that died before removing
        it) and is replaced, never inherited. False when the slot is prepared already."""
        _check_ep_id(ep_id)
        with self._policy_slot(ep_id):
            self._require_open()
            if ep_id in self._fresh_policy:
                return False
            if self.policy.lookup(U32Key(ep_id)) is not None:
                log.warning("endpoint id %d: replacing the policy map a removed endpoint "
                            "left in its slot", ep_id)
            fd = self._new_inner(ep_id, "pol")
            try:
                # the first policy may be filled in from now on, before or after the map
                # lands in the slot (either way the programs see no policy, then all of
                # it): through its own fd, as this one is closed after the update
                self._fresh_ids[ep_id] = libbpf.map_info(fd).id
                self._fresh_policy[ep_id] = os.dup(fd)
                # visible to the programs at once; the call then sleeps through the grace
                # period (`policy_in_place` tells the waiting create sooner)
                self.policy.update(U32Key(ep_id), U32Key(fd))
            except (DatapathError, OSError):
                libbpf.close(self._fresh_policy.pop(ep_id, None))
                self._fresh_ids.pop(ep_id, None)
                raise
            finally:
                libbpf.close(fd)
            return True

    def policy_in_place(self, ep_id: int) -> bool:
        """Does the endpoint's slot hold the map `prepare_policy` made for it (true as soon
        as the update lands, while `prepare_policy` still sleeps through its grace period)?"""
        found = self.policy.lookup(U32Key(ep_id))
        return found is not None and found.value == self._fresh_ids.get(ep_id)

    def release_policy(self, ep_id: int) -> bool:
        """Remove the endpoint's policy map (prepared or filled); False if it had none."""
        with self._policy_slot(ep_id):  # an RCU grace period: not under `_lock`
            libbpf.close(self._fresh_policy.pop(ep_id, None))
            self._fresh_ids.pop(ep_id, None)
            return self.policy.delete(U32Key(ep_id))

    def _policy_inner_fd(self, ep_id: int) -> int | None:
        inner_id = self.policy.lookup(U32Key(ep_id))
        if inner_id is None:
            return None
        return libbpf.map_get_fd_by_id(inner_id.value)

    def _current_revision(self, ep_id: int) -> int:
        fd = self._policy_inner_fd(ep_id)
        if fd is None:
            return 0
        try:
            meta = BpfMap(fd, "policy-inner", PolicyMapKey, PolicyMapEntry).lookup(PolicyMapKey.meta())
            return meta.revision if meta is not None else 0
        finally:
            libbpf.close(fd)

    def update_policy(self, ep_id: int, policy: EndpointPolicy) -> int:
        """Install `policy` for the endpoint atomically: a complete new inner map, then one
        update of the outer slot. On any failure the old policy stays and DatapathError is
        raised. Returns the datapath revision now in force (conntrack re-checks flows
        allowed under an older one)."""
        _check_ep_id(ep_id)
        for key, entry in policy.entries.items():
            _check_identity(key.identity, f"policy key {key}")
            if not 0 <= entry.proxy_port <= 0xFFFF:
                raise UserError(f"policy key {key}: proxy_port {entry.proxy_port} outside 0..65535")
        needed = entries_needed(policy)
        if needed > self.policy_capacity:
            self._full("policy", f"policy of endpoint {ep_id} NOT updated: it needs {needed} "
                                 f"policy map entries, more than the map holds "
                                 f"({self.policy_capacity}); the previous policy stays in force")
        self._require_open()
        entries = [(PolicyMapKey.of(k), encode_entry(k, e)) for k, e in policy.entries.items()]
        meta = encode_meta(policy)
        # a prepared map is filled without the slot's lock, which `prepare_policy` holds
        # while it sleeps through its grace period (the map is this call's alone once taken)
        fresh = self._fresh_policy.pop(ep_id, None)
        if fresh is not None:
            meta.revision = revision = (policy.revision or 1) & 0xFFFFFFFF
            self._fill_fresh(ep_id, fresh, entries, meta)
            return revision
        with self._policy_slot(ep_id):
            self._require_open()
            old_rev = self._current_revision(ep_id)
            revision = policy.revision if policy.revision > old_rev else old_rev + 1
            revision &= 0xFFFFFFFF
            meta.revision = revision
            self._install_inner(ep_id, self.policy, "pol", entries, meta)
            return revision

    def _new_inner(self, ep_id: int, prefix: str) -> int:
        return libbpf.map_create(libbpf.BPF_MAP_TYPE_LPM_TRIE, f"{prefix}_{ep_id}",
                                 ctypes.sizeof(PolicyMapKey), ctypes.sizeof(PolicyMapEntry),
                                 self.policy_capacity, flags=libbpf.BPF_F_NO_PREALLOC)

    def _fill_fresh(self, ep_id: int, inner_fd: int, entries: list,
                    meta: PolicyMapEntry) -> None:
        """The first policy of a prepared endpoint, written into the map already in its
        slot: the entries, then the meta entry (until that lands the programs drop every
        packet, so they never act on part of the policy). A map this fails to fill keeps
        no meta entry (still dropping everything) and later policies are swapped in."""
        try:
            inner = BpfMap(inner_fd, f"policy of endpoint {ep_id}", PolicyMapKey, PolicyMapEntry)
            for key, value in entries:
                inner.update(key, value)
            inner.update(PolicyMapKey.meta(), meta)
        except DatapathError as exc:
            raise DatapathError(f"first policy of endpoint {ep_id} NOT installed (its "
                                f"traffic stays dropped): {exc}") from exc
        finally:
            libbpf.close(inner_fd)

    def _install_inner(self, ep_id: int, outer: BpfMap, prefix: str, entries: list,
                       meta: PolicyMapEntry) -> None:
        """Fill a new inner map completely, then swap it into `outer` in one update."""
        inner_fd = self._new_inner(ep_id, prefix)
        try:
            inner = BpfMap(inner_fd, f"policy of endpoint {ep_id}", PolicyMapKey, PolicyMapEntry)
            for key, value in entries:
                inner.update(key, value)
            inner.update(PolicyMapKey.meta(), meta)
            outer.update(U32Key(ep_id), U32Key(inner_fd))
        except DatapathError as exc:
            raise DatapathError(f"policy of endpoint {ep_id} NOT updated (the previous "
                                f"policy stays in force): {exc}") from exc
        finally:
            libbpf.close(inner_fd)

    def dump_policy(self, ep_id: int) -> dict[str, Any]:
        with self._lock:
            self._require_open()
            fd = self._policy_inner_fd(ep_id)
            if fd is None:
                return {"ep_id": ep_id, "loaded": False, "entries": []}
            try:
                items = list(BpfMap(fd, "policy-inner", PolicyMapKey, PolicyMapEntry).items())
            finally:
                libbpf.close(fd)
        out: dict[str, Any] = {"ep_id": ep_id, "loaded": True, "entries": []}
        for key, value in items:
            if key.is_meta:
                out["ingress_enforced"] = bool(value.flags & 1)
                out["egress_enforced"] = bool(value.flags & 2)
                out["revision"] = value.revision
                continue
            port_prefix = max(0, key.prefixlen - 48)
            port = key.port if key.prefixlen > 40 + 8 else 0
            span = 1 << (16 - port_prefix)
            out["entries"].append({
                "verdict": "deny" if value.flags & POLICY_F_DENY else
                           ("redirect" if value.proxy_port else "allow"),
                "direction": Direction(key.direction).name.lower(),
                "identity": key.identity_value,
                "protocol": PROTOCOL_NAMES.get(key.protocol, str(key.protocol)) if key.prefixlen > 40 else "ANY",
                "port": port if port_prefix else 0,
                "port_prefix_len": port_prefix,
                "port_range": [port, port + span - 1] if port_prefix else [0, 65535],
                "proxy_port": value.proxy_port,
                "prefix_len": value.lpm_prefix_len,
            })
        out["entries"].sort(key=lambda e: (e["direction"], e["identity"], e["protocol"], e["port"]))
        return out

    # -- ipcache --------------------------------------------------------------------

    def upsert_ipcache(self, cidr: str, identity: int, tunnel_endpoint: str | None = None) -> None:
        _check_identity(identity, f"ipcache {cidr}")
        try:
            key = IpcacheKey.of(cidr)
            tunnel = ipaddress.IPv4Address(tunnel_endpoint).packed if tunnel_endpoint else bytes(4)
        except ValueError as exc:
            raise UserError(f"ipcache entry {cidr}: {exc}") from None
        with self._lock:
            self._require_open()
            try:
                self.ipcache.update(key, RemoteEndpointInfo(identity,
                                                            (ctypes.c_uint8 * 4)(*tunnel)))
            except DatapathError as exc:
                if _errno(exc) not in (errno.E2BIG, errno.ENOSPC):  # LPM trie full: E2BIG
                    raise
                size = libbpf.map_info(self.ipcache.fd).max_entries
                self._full("ipcache", f"ipcache entry {cidr} NOT added: the ipcache is full "
                                      f"({size} entries); traffic from that address keeps "
                                      "the identity it had (world when new)")

    def _full(self, name: str, message: str) -> None:
        """Count, log and raise a map-full refusal (nothing was changed)."""
        self.map_full[name] = self.map_full.get(name, 0) + 1
        log.error("%s", message)
        raise MapFull(message)

    def lookup_ipcache(self, address: str) -> int | None:
        """The identity the ipcache gives `address` (longest prefix match), or None."""
        try:
            key = IpcacheKey.of(f"{address}/32")
        except ValueError as exc:
            raise UserError(f"ipcache lookup {address}: {exc}") from None
        with self._lock:
            self._require_open()
            found = self.ipcache.lookup(key)
        return int(found.identity) if found is not None else None

    def delete_ipcache(self, cidr: str) -> bool:
        try:
            key = IpcacheKey.of(cidr)
        except ValueError as exc:
            raise UserError(f"ipcache entry {cidr}: {exc}") from None
        with self._lock:
            self._require_open()
            return self.ipcache.delete(key)

    # -- listings -------------------------------------------------------------------

    def dump_endpoints(self) -> list[dict[str, Any]]:
        with self._lock:
            self._require_open()
            rows = [{"ep_id": v.ep_id, "ipv4": k.ip, "ifindex": v.ifindex,
                     "identity": v.identity, "ep_mac": mac_str(v.mac),
                     "host_mac": mac_str(v.host_mac)} for k, v in self.endpoints.items()]
        return sorted(rows, key=lambda r: r["ep_id"])

    def dump_ipcache(self) -> list[dict[str, Any]]:
        with self._lock:
            self._require_open()
            rows = []
            for k, v in self.ipcache.items():
                tunnel = bytes(v.tunnel_endpoint)
                rows.append({"cidr": k.cidr, "identity": v.identity,
                             "tunnel_endpoint": str(ipaddress.IPv4Address(tunnel)) if any(tunnel) else None})
        return sorted(rows, key=lambda r: (ipaddress.IPv4Network(r["cidr"]).network_address,
                                           ipaddress.IPv4Network(r["cidr"]).prefixlen))

    def dump_ct(self) -> list[dict[str, Any]]:
        now = time.monotonic_ns()
        with self._lock:
            self._require_open()
            rows = []
            for k, v in self.conntrack.items_batched():
                proto = k.protocol
                rows.append({
                    "src": str(ipaddress.IPv4Address(bytes(k.saddr))),
                    "dst": str(ipaddress.IPv4Address(bytes(k.daddr))),
                    "sport": int.from_bytes(bytes(k.sport), "big"),
                    "dport": int.from_bytes(bytes(k.dport), "big"),
                    "protocol": PROTOCOLS.get(proto, str(proto)),
                    "direction": CT_DIRECTIONS.get(k.direction, str(k.direction)),
                    "ep_id": v.ep_id, "src_identity": v.src_identity,
                    "expires_in_s": round((v.expires_ns - now) / 1e9, 1),
                    "expired": v.expires_ns <= now,
                    "packets": v.packets, "bytes": v.bytes,
                    "seen_reply": bool(v.flags & CT_F_SEEN_REPLY),
                    "closing": bool(v.flags & CT_F_CLOSING),
                    "policy_revision": v.policy_rev, "proxy_port": v.proxy_port,
                    "rev_nat_index": v.rev_nat_index, "backend_id": v.backend_id,
                })
        return rows

    def dump_metrics(self) -> list[dict[str, Any]]:
        with self._lock:
            self._require_open()
            rows = []
            for k, per_cpu in self.metrics.items():
                rows.append({"reason": k.reason, "reason_desc": reason_name(k.reason),
                             "direction": CT_DIRECTIONS.get(k.direction, str(k.direction)),
                             "packets": sum(v.packets for v in per_cpu),
                             "bytes": sum(v.bytes for v in per_cpu)})
        return sorted(rows, key=lambda r: (r["reason"], r["direction"]))

    def map_pressure(self) -> dict[str, float]:
        """Fill ratio (entries / max_entries) of each of PRESSURE_MAPS, by map name."""
        with self._lock:
            self._require_open()
            out: dict[str, float] = {}
            for name in PRESSURE_MAPS:
                bpf_map: BpfMap = getattr(self, name)
                max_entries = libbpf.map_info(bpf_map.fd).max_entries
                if max_entries:
                    out[name] = sum(1 for _ in bpf_map.keys()) / max_entries
            return out

    def event_maps(self) -> tuple[Path, Path]:
        """Pin paths of the events ring buffer and its per-CPU lost counter."""
        return self.root / "events", self.root / "events_lost"

    def events_lost(self) -> int:
        with self._lock:
            self._require_open()
            per_cpu = self.events_lost_map.lookup(U32Key(0)) or []
            return sum(v.value for v in per_cpu)

    def ct_gc(self) -> int:
        """Delete expired conntrack entries; returns how many. The table is read in batches
        (a few syscalls for 65,536 entries); each candidate is read again just before its
        delete, so a flow whose packet refreshed it meanwhile keeps its entry."""
        removed = seen = 0
        with self._lock:
            self._require_open()
            now = time.monotonic_ns()
            for key, value in self.conntrack.items_batched():
                seen += 1
                if value.expires_ns > now:
                    continue
                again = self.conntrack.lookup(key)
                if again is not None and again.expires_ns <= time.monotonic_ns():
                    removed += self.conntrack.delete(key)
            if self.ct_capacity is None:
                self.ct_capacity = libbpf.map_info(self.conntrack.fd).max_entries or None
        #: entries left after the last collection (the GC loop adapts its interval to it)
        self.ct_entries = seen - removed
        return removed

    def ct_service_peers(self) -> set[tuple[str, int, int]]:
        """(address, port, protocol) of every backend a live service flow's endpoint-side
        conntrack entry goes to: the flows a removed backend must go on serving before
        its lb4_backends entry may go. The endpoint-side entries see both directions (a
        reset from the server included); the service-scope ones see only the client's."""
        peers: set[tuple[str, int, int]] = set()
        with self._lock:
            self._require_open()
            now = time.monotonic_ns()
            for key, value in self.conntrack.items_batched():
                if (value.rev_nat_index and key.direction != CT_DIR_SERVICE
                        and value.expires_ns > now):
                    peers.add((str(ipaddress.IPv4Address(bytes(key.daddr))),
                               int.from_bytes(bytes(key.dport), "big"), key.protocol))
        return peers

    def ct_backend_ids(self) -> set[int]:
        """Backend ids the live service-scope conntrack entries name (the backend each
        flow through a service goes to)."""
        ids: set[int] = set()
        with self._lock:
            self._require_open()
            now = time.monotonic_ns()
            for key, value in self.conntrack.items_batched():
                if key.direction == CT_DIR_SERVICE and value.backend_id and \
                        value.expires_ns > now:
                    ids.add(value.backend_id)
        return ids

    # -- trace ----------------------------------------------------------------------

    def run_program(self, name: str, packet: bytes, ifindex: int, mark: int = 0,
                    repeat: int = 1, dry_run: bool = False,
                    src_identity: int | None = None,
                    ingress_ifindex: int = 0) -> tuple[int, SkBuff, int]:
        """BPF_PROG_TEST_RUN of one loaded program: (retval, ctx out, ns per run). A dry run
        writes no conntrack, events or metrics and may impose the source identity.
        `ingress_ifindex` 0 = a packet sent by a socket of the node, else received there."""
        self._require_open()
        return testrun.run_program(self.prog_fds[name], packet, ifindex, mark=mark,
                                   repeat=repeat, dry_run=dry_run, src_identity=src_identity,
                                   ingress_ifindex=ingress_ifindex)

    def trace(self, ep_id: int, direction: Direction | str, src_ip: str, dst_ip: str,
              sport: int, dport: int, proto: int | str,
              src_identity: int | None = None) -> dict[str, Any]:
        """Run the endpoint's program on a synthesized packet (dry run: no conntrack
        writes, events or metrics) and report what the kernel decided."""
        direction = testrun.parse_direction(direction)
        proto = testrun.parse_protocol(proto)
        if src_identity is not None:
            _check_identity(src_identity, "src_identity")
        with self._lock:
            self._require_open()
            found = self._find_endpoint(ep_id)
            if found is None:
                raise UserError(f"endpoint {ep_id} is not in the datapath")
            _key, ep = found
            program, pkt = testrun.trace_packet(direction, bytes(ep.mac), bytes(ep.host_mac),
                                                src_ip, dst_ip, sport, dport, proto)
            retval, ctx, _ns = self.run_program(
                program, pkt, ep.ifindex, dry_run=True,
                src_identity=src_identity if direction == Direction.INGRESS else None)
        return decode_result(retval, ctx, program, direction)
