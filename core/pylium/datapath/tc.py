"""tc clsact attachment through libbpf (`bpf_tc_*`): a filter survives the agent's death
with no pin, and `replace` swaps the program in one netlink request."""

from __future__ import annotations

import ctypes
import errno

from pylium.datapath import libbpf
from pylium.datapath.libbpf import BpfTcHook, BpfTcOpts, lib

#: the filter pylium owns on each hook (fixed handle/priority: re-attach replaces it)
HANDLE = 0x1
PRIORITY = 0x1
INGRESS = libbpf.BPF_TC_INGRESS
EGRESS = libbpf.BPF_TC_EGRESS


def _hook(ifindex: int, point: int) -> BpfTcHook:
    return BpfTcHook(sz=ctypes.sizeof(BpfTcHook), ifindex=ifindex, attach_point=point)


def attach(ifindex: int, point: int, prog_fd: int) -> None:
    """Attach (or replace) pylium's direct-action filter on `ifindex`'s clsact hook."""
    _create_clsact(ifindex)
    _attach(_hook(ifindex, point), prog_fd)


def attach_both(ifindex: int, ingress_fd: int, egress_fd: int) -> None:
    """`attach` on both hooks of `ifindex` with one clsact qdisc create: an endpoint's two
    programs on its new veth (a pod start). Asking for the qdisc again for the second hook
    cost a netlink round trip and a kernel refusal that libbpf logs ("Exclusivity flag
    on"): one per pod start, which crowded the verifier's messages out of `log_tail`."""
    _create_clsact(ifindex)
    _attach(_hook(ifindex, INGRESS), ingress_fd)
    _attach(_hook(ifindex, EGRESS), egress_fd)


def _create_clsact(ifindex: int) -> None:
    """The clsact qdisc both hooks hang off (there already: fine)."""
    rc = lib.bpf_tc_hook_create(ctypes.byref(_hook(ifindex, INGRESS)))
    if rc < 0 and libbpf.errno_of(rc) != errno.EEXIST:
        libbpf.check(rc, f"creating clsact qdisc on ifindex {ifindex}")


def _attach(hook: BpfTcHook, prog_fd: int) -> None:
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), prog_fd=prog_fd, flags=libbpf.BPF_TC_F_REPLACE,
                     handle=HANDLE, priority=PRIORITY)
    libbpf.check(lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
                 f"attaching tc {'ingress' if hook.attach_point == INGRESS else 'egress'} "
                 f"program on ifindex {hook.ifindex}")


def query(ifindex: int, point: int) -> int | None:
    """The id of the program pylium attached there, or None."""
    hook = _hook(ifindex, point)
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), handle=HANDLE, priority=PRIORITY)
    rc = lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if rc < 0:
        return None
    return opts.prog_id


def detach(ifindex: int, point: int) -> bool:
    hook = _hook(ifindex, point)
    opts = BpfTcOpts(sz=ctypes.sizeof(BpfTcOpts), handle=HANDLE, priority=PRIORITY)
    rc = lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if rc < 0:
        if libbpf.errno_of(rc) in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        libbpf.check(rc, f"detaching tc program from ifindex {ifindex}")
    return True
