"""Socket-level load balancing: bpf/bpf_sock.c loaded next to the endpoint datapath (it
shares the pinned LB maps) and attached to one cgroup v2 directory: processes in that
cgroup connect() straight to a backend when they name a service VIP.

Attach only to a cgroup holding the pods' processes, never to a host's root cgroup: every
process below it would have its connections to VIPs rewritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pylium.datapath import libbpf
from pylium.datapath.compile import bpf_source_dir
from pylium.datapath.libbpf import DatapathError, lib

#: program -> kernel attach type (enum bpf_attach_type)
PROGRAMS = {"sock4_connect": 10,       # BPF_CGROUP_INET4_CONNECT
            "sock4_sendmsg": 14,       # BPF_CGROUP_UDP4_SENDMSG
            "sock4_recvmsg": 19,       # BPF_CGROUP_UDP4_RECVMSG
            "sock4_getpeername": 29}   # BPF_CGROUP_INET4_GETPEERNAME
#: exclusive attachment: a restarted agent's attach replaces its predecessor's program
ATTACH_FLAGS = 0


class SocketLB:
    def __init__(self, datapath):
        self.datapath = datapath
        self.object = None  # LoadedObject, on first attach
        self.prog_fds: dict[str, int] = {}
        self.cgroup: Path | None = None

    def attach(self, cgroup: str | Path) -> None:
        """Load (once) and attach every program to cgroup v2 directory `cgroup`."""
        cgroup = Path(cgroup)
        if not (cgroup / "cgroup.procs").is_file():
            raise DatapathError(f"socket LB: {cgroup} is not a cgroup v2 directory")
        if not self.prog_fds:
            self.object = self.datapath.load_object(bpf_source_dir() / "bpf_sock.c")
            self.prog_fds = {name: self.object.program(name) for name in PROGRAMS}
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, attach_type in PROGRAMS.items():
                libbpf.check(lib.bpf_prog_attach(self.prog_fds[name], fd, attach_type,
                                                 ATTACH_FLAGS),
                             f"attaching {name} to {cgroup}")
        finally:
            os.close(fd)
        self.cgroup = cgroup

    def detach(self) -> None:
        if self.cgroup is None:
            return
        try:
            fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self.cgroup = None  # the cgroup is gone, and its attachments with it
            return
        try:
            for name, attach_type in PROGRAMS.items():
                lib.bpf_prog_detach2(self.prog_fds[name], fd, attach_type)
        finally:
            os.close(fd)
        self.cgroup = None

    def close(self) -> None:
        """Drop our fds; attached programs stay (socket LB goes on without the agent)."""
        if self.object is not None:
            self.object.close()
            self.object = None
        self.prog_fds = {}


def destroy_udp_sockets(netns: str, ip: str, port: int) -> int:
    """Destroy (SOCK_DESTROY, `ss -K`) the UDP sockets in `netns` connected to ip:port: a
    connected UDP socket keeps the backend its connect() picked, so when that backend goes
    away its owner gets an error and connects again, which picks a live backend (the
    problem of cilium#24417). Returns how many sockets were destroyed."""
    from pylium.datapath.netns import netns_path

    proc = subprocess.run(["nsenter", f"--net={netns_path(netns)}", "ss", "-K", "-u", "-n",
                           "-H", "dst", f"{ip}:{port}"],
                          capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise DatapathError(f"destroying UDP sockets to {ip}:{port} in {netns}: "
                            f"{proc.stderr.strip()}")
    return len([line for line in proc.stdout.splitlines() if line.strip()])
