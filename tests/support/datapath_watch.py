"""Watch, until SIGTERM, what must never go missing while an agent swaps its BPF objects:
the tc program on both hooks of each endpoint's veth and each endpoint's policy map. Run it
in the node's netns (the veths are there); prints one JSON line.

Two ways: the kernel's own tc notifications (RTNLGRP_TC), which name every filter, chain or
qdisc deleted on a veth (a `tc filter replace` sends only RTM_NEWTFILTER; delete + add sends
RTM_DELTFILTER first: a window without a program, however short), and sampling as fast as
it can (the program ids on each hook, the policy map of each endpoint).

    datapath_watch.py BPFFS_ROOT EP_ID:IFINDEX [EP_ID:IFINDEX ...]

Reports, per endpoint, the program ids seen on each hook, samples with no program, the
policy inner-map ids seen (with their entry counts) and samples with no policy; and the ids
of the pinned maps at start and at the end (a reused map keeps its id)."""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from pylium.datapath import libbpf, tc
from pylium.datapath.datapath import PINNED_MAPS
from pylium.datapath.maps.base import BpfMap
from pylium.datapath.maps.metrics import U32Key
from pylium.datapath.maps.policy import PolicyMapEntry, PolicyMapKey

stop = False
RTMGRP_TC = 1 << 3  # RTNLGRP_TC
#: rtnetlink message types: a deletion on a watched veth opens a window without a program
NEW_FILTER = 44
DELETIONS = {37: "RTM_DELQDISC", 45: "RTM_DELTFILTER", 101: "RTM_DELCHAIN"}


def listen_tc(ifindexes: set[int], seen: dict) -> socket.socket:
    """Count tc notifications about `ifindexes` into `seen` (a thread reads them)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((0, RTMGRP_TC))

    def read() -> None:
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError as exc:  # ENOBUFS: notifications were lost, say so
                seen["errors"].append(str(exc))
                continue
            offset = 0
            while offset + 24 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                ifindex = struct.unpack_from("=i", data, offset + 20)[0]  # tcmsg.tcm_ifindex
                if ifindex in ifindexes:
                    if kind == NEW_FILTER:
                        seen["new_filters"] += 1
                    elif kind in DELETIONS:
                        seen["deletions"].append(f"{DELETIONS[kind]} ifindex {ifindex}")
                offset += max(16, (length + 3) & ~3)

    threading.Thread(target=read, daemon=True).start()
    return sock


def _on_term(_sig, _frame) -> None:
    global stop
    stop = True


def pinned_ids(root: Path) -> dict[str, int]:
    out = {}
    for name in PINNED_MAPS:
        fd = libbpf.obj_get(str(root / name))
        try:
            out[name] = libbpf.map_info(fd).id
        finally:
            libbpf.close(fd)
    return out


def inner_entries(map_id: int) -> int:
    """Entries of one endpoint's policy map (its meta entry included)."""
    fd = libbpf.map_get_fd_by_id(map_id)
    try:
        return sum(1 for _ in BpfMap(fd, "policy-inner", PolicyMapKey, PolicyMapEntry,
                                     owned=False).keys())
    finally:
        libbpf.close(fd)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    root = Path(argv[0])
    endpoints = [tuple(int(x) for x in a.split(":")) for a in argv[1:]]
    policy_fd = libbpf.obj_get(str(root / "policy"))
    outer = BpfMap(policy_fd, "policy", U32Key, U32Key, owned=False)
    out = {"pinned_before": pinned_ids(root), "samples": 0, "endpoints": {}}
    eps = {ep: {"ifindex": ifindex, "ingress_progs": [], "egress_progs": [],
                "missing_prog": 0, "policy_maps": {}, "missing_policy": 0}
           for ep, ifindex in endpoints}
    tc_events: dict = {"new_filters": 0, "deletions": [], "errors": []}
    listen_tc({ifindex for _ep, ifindex in endpoints}, tc_events)
    print("ready", flush=True)
    started = time.monotonic()
    while not stop:
        for ep, seen in eps.items():
            for point, key in ((tc.INGRESS, "ingress_progs"), (tc.EGRESS, "egress_progs")):
                prog = tc.query(seen["ifindex"], point)
                if prog is None:
                    seen["missing_prog"] += 1
                elif prog not in seen[key]:
                    seen[key].append(prog)
            inner = outer.lookup(U32Key(ep))
            if inner is None:
                seen["missing_policy"] += 1
            elif str(inner.value) not in seen["policy_maps"]:
                seen["policy_maps"][str(inner.value)] = inner_entries(inner.value)
        out["samples"] += 1
    out["seconds"] = round(time.monotonic() - started, 2)
    out["endpoints"] = {str(ep): seen for ep, seen in eps.items()}
    out["pinned_after"] = pinned_ids(root)
    time.sleep(0.2)  # the last notifications
    out["tc_events"] = tc_events
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
