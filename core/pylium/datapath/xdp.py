"""NodePort acceleration: bpf/bpf_xdp.c (sharing the pinned LB maps) attached at XDP on the
node's external interface, native (in the driver) or generic (in the stack); Cilium's
`--bpf-lb-acceleration`."""

from __future__ import annotations

import logging

from pylium.datapath import libbpf
from pylium.datapath.compile import bpf_source_dir
from pylium.datapath.libbpf import DatapathError, lib

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class NodePortXDP:
    def __init__(self, datapath):
        self.datapath = datapath
        self.object = None  # LoadedObject, on first attach
        self.ifindex = 0
        self.mode = ""

    def attach(self, ifindex: int, mode: str) -> str:
        """Attach in `mode` ("native" falls back to "generic" where the driver refuses);
        returns the mode in force."""
        if mode not in MODES:
            raise DatapathError(f"XDP mode {mode!r}: native or generic")
        if self.object is None:
            self.object = self.datapath.load_object(bpf_source_dir() / "bpf_xdp.c")
        fd = self.object.program("xdp_nodeport")
        rc = lib.bpf_xdp_attach(ifindex, fd, MODES[mode], None)
        if rc < 0 and mode == "native":
            log.warning("native XDP refused on ifindex %d (%s); using generic XDP", ifindex,
                        libbpf.errno_of(rc))
            mode = "generic"
            rc = lib.bpf_xdp_attach(ifindex, fd, MODES[mode], None)
        libbpf.check(rc, f"attaching XDP ({mode}) to ifindex {ifindex}")
        self.ifindex, self.mode = ifindex, mode
        return mode

    def detach(self) -> None:
        if self.ifindex:
            lib.bpf_xdp_detach(self.ifindex, MODES[self.mode], None)
            self.ifindex = 0

    def close(self) -> None:
        """Drop our fds; the program stays attached (NodePort goes on without the agent)."""
        if self.object is not None:
            self.object.close()
            self.object = None
