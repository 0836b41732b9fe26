"""Test topology helpers: uniquely named netns, veth pairs, and a worker thread that lives
inside a netns (setns on one thread only) so BPF attach and test runs happen there."""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import subprocess
import uuid
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def unique(prefix: str) -> str:
    return f"pyl-{prefix}-{uuid.uuid4().hex[:6]}"


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def in_ns(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--net=/run/netns/{ns}", *args, check=check, timeout=timeout)


class NetnsWorker:
    """Runs callables on one thread that has joined netns `ns`."""

    def __init__(self, ns: str):
        self.ns = ns
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, initializer=_setns, initargs=(f"/run/netns/{ns}",))

    def run(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def link_info(ns: str, name: str) -> tuple[int, str]:
    info = json.loads(in_ns(ns, "ip", "-j", "link", "show", "dev", name).stdout)[0]
    return int(info["ifindex"]), info["address"]


class Topology:
    """A node netns with pods: each pod is a netns whose eth0 pairs with a host-side veth
    in the node netns, a /32 address, a default route via 169.254.1.1 and a static
    neighbour entry to the host side."""

    GATEWAY = "169.254.1.1"

    def __init__(self, purpose: str):
        self.node = unique(purpose)
        self.pods: dict[str, dict] = {}
        self._namespaces = [self.node]
        sh("ip", "netns", "add", self.node)
        in_ns(self.node, "ip", "link", "set", "lo", "up")
        in_ns(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def add_pod(self, name: str, ip: str) -> dict:
        ns = f"{self.node}-{name}"[:30]
        host_if = f"lxc{uuid.uuid4().hex[:8]}"
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(self.node, "ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
              "netns", ns)
        in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        in_ns(self.node, "sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
        in_ns(self.node, "ip", "link", "set", host_if, "up")
        in_ns(ns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        host_ifindex, host_mac = link_info(self.node, host_if)
        _, pod_mac = link_info(ns, "eth0")
        in_ns(ns, "ip", "route", "add", self.GATEWAY, "dev", "eth0", "scope", "link")
        in_ns(ns, "ip", "route", "add", "default", "via", self.GATEWAY, "dev", "eth0")
        in_ns(ns, "ip", "neigh", "add", self.GATEWAY, "lladdr", host_mac, "dev", "eth0",
              "nud", "permanent")
        in_ns(self.node, "ip", "route", "add", f"{ip}/32", "dev", host_if)
        in_ns(self.node, "ip", "neigh", "add", ip, "lladdr", pod_mac, "dev", host_if,
              "nud", "permanent")
        pod = {"name": name, "ns": ns, "ip": ip, "host_if": host_if, "ifindex": host_ifindex,
               "host_mac": host_mac, "mac": pod_mac}
        self.pods[name] = pod
        return pod

    def destroy(self) -> None:
        for ns in reversed(self._namespaces):
            sh("ip", "netns", "del", ns, check=False)


def bpffs_root() -> Path:
    if not os.path.ismount("/sys/fs/bpf"):
        sh("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
    return Path(f"/sys/fs/bpf/pylium-test-{uuid.uuid4().hex[:8]}")
