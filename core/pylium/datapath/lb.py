"""`LbMaps`: the service load-balancing maps of one node (bpf/lib/lb.h), opened from their
pins under the datapath's bpffs root (the `Datapath` creates and pins them with the other
maps; this module only reads and writes them).

Update order follows Cilium's: backends first, then the backend slots and the Maglev table,
then the master entry (which makes the new slot count visible), then stale slots are
removed; a service is never seen with a slot that names a missing backend."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pylium.datapath import libbpf
from pylium.datapath.libbpf import DatapathError, lib
from pylium.datapath.maps.base import BpfMap
from pylium.datapath.maps.events import PROTOCOLS
from pylium.datapath.maps.lb import (
    BACKEND_STATES,
    BPF_F_INNER_MAP,
    LB_ALG_MAGLEV,
    SVC_F_AFFINITY,
    SVC_F_LOCAL,
    SVC_F_NODEPORT,
    Lb4AffinityKey,
    Lb4AffinityVal,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    U16Key,
)
from pylium.datapath.maps.metrics import U32Key

MAP_NAMES = ("lb4_services", "lb4_backends", "lb4_reverse_nat", "lb4_maglev", "lb4_affinity")

_STATE_NAMES = {v: k for k, v in BACKEND_STATES.items()}


class LbMaps:
    """Thread-safe access to the LB maps pinned under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.RLock()
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                fds[name] = libbpf.obj_get(str(self.root / name))
        except DatapathError:
            for fd in fds.values():
                libbpf.close(fd)
            raise
        self.services = BpfMap(fds["lb4_services"], "lb4_services", Lb4Key, Lb4Service)
        self.backends = BpfMap(fds["lb4_backends"], "lb4_backends", U32Key, Lb4Backend)
        self.reverse_nat = BpfMap(fds["lb4_reverse_nat"], "lb4_reverse_nat", U16Key,
                                  Lb4ReverseNat)
        self.maglev = BpfMap(fds["lb4_maglev"], "lb4_maglev", U32Key, U32Key)
        self.affinity = BpfMap(fds["lb4_affinity"], "lb4_affinity", Lb4AffinityKey,
                               Lb4AffinityVal)

    def close(self) -> None:
        for m in (self.services, self.backends, self.reverse_nat, self.maglev, self.affinity):
            m.close()

    # backends ------------------------------------------------------------------------
    def upsert_backend(self, backend_id: int, ip: str, port: int, proto: int,
                       state: str = "active") -> None:
        with self._lock:
            self.backends.update(U32Key(backend_id),
                                 Lb4Backend.of(ip, port, proto, BACKEND_STATES[state]))

    def delete_backend(self, backend_id: int) -> bool:
        with self._lock:
            return self.backends.delete(U32Key(backend_id))

    # services ------------------------------------------------------------------------
    def upsert_service(self, svc_id: int, vip: str, port: int, proto: int,
                       backend_ids: list[int], *, algorithm: int, lut: list[int] | None,
                       affinity_timeout: int = 0, nodeport: bool = False,
                       local: bool = False, lut_installed: bool = False) -> None:
        """Install one frontend: slots, Maglev table (if `lut`), reverse NAT, master.
        `lut_installed`: the pinned table already is `lut` (an agent restart): kept."""
        flags = ((SVC_F_AFFINITY if affinity_timeout else 0) | (SVC_F_NODEPORT if nodeport else 0)
                 | (SVC_F_LOCAL if local else 0))
        with self._lock:
            old = self.services.lookup(Lb4Key.of(vip, port, proto))
            for slot, backend_id in enumerate(backend_ids, start=1):
                self.services.update(Lb4Key.of(vip, port, proto, slot),
                                     Lb4Service(backend_id, 0, svc_id, 0, 0, 0, 0))
            lut_size = 0
            if algorithm == LB_ALG_MAGLEV and lut:
                if not lut_installed:
                    self._install_lut(svc_id, lut)
                lut_size = len(lut)
            self.reverse_nat.update(U16Key(svc_id), Lb4ReverseNat.of(vip, port))
            self.services.update(Lb4Key.of(vip, port, proto),
                                 Lb4Service(affinity_timeout, len(backend_ids), svc_id, flags,
                                            algorithm, 0, lut_size))
            if old is not None:
                for slot in range(len(backend_ids) + 1, old.count + 1):
                    self.services.delete(Lb4Key.of(vip, port, proto, slot))
            if algorithm != LB_ALG_MAGLEV or not lut:
                self.maglev.delete(U32Key(svc_id))

    def _install_lut(self, svc_id: int, lut: list[int]) -> None:
        """A complete new lookup table, then one swap of the outer slot."""
        size = len(lut)
        fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, f"maglev_{svc_id}", 4, 4, size,
                               flags=BPF_F_INNER_MAP)
        try:
            keys = (ctypes.c_uint32 * size)(*range(size))
            values = (ctypes.c_uint32 * size)(*lut)
            count = ctypes.c_uint32(size)
            rc = lib.bpf_map_update_batch(fd, keys, values, ctypes.byref(count), None)
            if rc < 0:  # older kernels: one update per entry
                inner = BpfMap(fd, "maglev-inner", U32Key, U32Key, owned=False)
                for i, backend_id in enumerate(lut):
                    inner.update(U32Key(i), U32Key(backend_id))
            self.maglev.update(U32Key(svc_id), U32Key(fd))
        finally:
            libbpf.close(fd)

    def delete_service(self, svc_id: int, vip: str, port: int, proto: int) -> None:
        with self._lock:
            master = self.services.lookup(Lb4Key.of(vip, port, proto))
            self.services.delete(Lb4Key.of(vip, port, proto))
            if master is not None:
                for slot in range(1, master.count + 1):
                    self.services.delete(Lb4Key.of(vip, port, proto, slot))
            self.maglev.delete(U32Key(svc_id))
            self.reverse_nat.delete(U16Key(svc_id))

    # listings ------------------------------------------------------------------------
    def dump(self) -> list[dict[str, Any]]:
        """Every frontend with its backend slots (`pylium bpf lb list`)."""
        with self._lock:
            backends = {k.value: v for k, v in self.backends.items()}
            entries = list(self.services.items())
        masters = {(k.ip, k.port, k.proto): v for k, v in entries if k.backend_slot == 0}
        slots: dict[tuple, list[tuple[int, int]]] = {}
        for k, v in entries:
            if k.backend_slot:
                slots.setdefault((k.ip, k.port, k.proto), []).append((k.backend_slot, v.backend_id))
        rows = []
        for (ip, port, proto), master in sorted(masters.items()):
            rows.append({
                "frontend": f"{ip}:{port}/{PROTOCOLS.get(proto, proto)}",
                "id": master.rev_nat_index, "count": master.count,
                "algorithm": "maglev" if master.algorithm == LB_ALG_MAGLEV else "random",
                "lut_size": master.lut_size,
                "affinity_timeout": master.backend_id if master.flags & SVC_F_AFFINITY else 0,
                "flags": master.flags,
                "backends": [_backend_row(slot, bid, backends.get(bid))
                             for slot, bid in sorted(slots.get((ip, port, proto), []))],
            })
        return rows

    def dump_backends(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k.value: {"ip": v.ip, "port": v.port_value, "proto": v.proto,
                              "address": f"{v.ip}:{v.port_value}",
                              "state": _STATE_NAMES.get(v.flags, str(v.flags))}
                    for k, v in self.backends.items()}

    def affinity_backend_ids(self) -> set[int]:
        """Backend ids the session-affinity entries name (a client's next connection to
        the service goes to that backend if it is still usable)."""
        with self._lock:
            return {v.backend_id for _k, v in self.affinity.items_batched()}

    def dump_maglev(self, svc_ids: Iterable[int] | None = None) -> dict[int, list[int]]:
        """The lookup table of each Maglev service (`pylium bpf lb maglev list`)."""
        out: dict[int, list[int]] = {}
        with self._lock:
            for key, inner_id in list(self.maglev.items()):
                if svc_ids is not None and key.value not in svc_ids:
                    continue
                fd = libbpf.map_get_fd_by_id(inner_id.value)
                try:
                    inner = BpfMap(fd, "maglev-inner", U32Key, U32Key, owned=False)
                    size = libbpf.map_info(fd).max_entries
                    out[key.value] = [inner.lookup(U32Key(i)).value for i in range(size)]
                finally:
                    libbpf.close(fd)
        return out


def _backend_row(slot: int, backend_id: int, be: Lb4Backend | None) -> dict[str, Any]:
    if be is None:
        return {"slot": slot, "backend_id": backend_id, "address": None, "state": "missing"}
    return {"slot": slot, "backend_id": backend_id, "address": f"{be.ip}:{be.port_value}",
            "state": _STATE_NAMES.get(be.flags, str(be.flags))}


#: our tc filter on the node's external interface: its own handle/priority, so it never
#: replaces a routing mode's filter (which uses tc.HANDLE/tc.PRIORITY there)
NODEPORT_HANDLE = 0x2
NODEPORT_PRIORITY = 0x2


def attach_nodeport(prog_fd: int, node_ip: str) -> str | None:
    """Attach `from_netdev` to the ingress of the interface holding `node_ip` (in the
    calling thread's netns); returns the interface name, or None if no interface holds it.
    A routing mode's filter there (geneve, vxlan in BPF) runs first, at priority 1, and hands
    every packet it does not decapsulate on to this one (TC_ACT_UNSPEC)."""
    from pylium.datapath import netns as plumbing
    from pylium.datapath import tc
    from pylium.datapath.libbpf import BpfTcOpts

    ifname = plumbing.link_with_address(node_ip)
    if ifname is None:
        return None
    ifindex = plumbing.link_info(ifname).ifindex
    hook = tc._hook(ifindex, tc.INGRESS)
    rc = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if rc < 0 and libbpf.errno_of(rc) != 17:  # EEXIST
        libbpf.check(rc, f"creating clsact qdisc on {ifname}")
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), prog_fd=prog_fd,
                     flags=libbpf.BPF_TC_F_REPLACE, handle=NODEPORT_HANDLE,
                     priority=NODEPORT_PRIORITY)
    libbpf.check(lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
                 f"attaching from_netdev to {ifname}")
    return ifname
