"""A client netns, a router netns (where the proxy runs, with a TPROXY rule in THAT netns
only) and a server netns, wired with veths: the transparent-proxy path without pylium's
datapath (the BPF redirect lands separately; TPROXY gives the proxy the same sockets)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import socket
import subprocess
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

CLIENT_IP = "10.231.1.2"
ROUTER_CLIENT_IP = "10.231.1.1"
SERVER_IP = "10.231.2.2"
ROUTER_SERVER_IP = "10.231.2.1"
#: destination ports the router sends to the proxy: 80 -> ingress listener, 8080 -> egress,
#: 81 -> ingress with nothing listening behind it
INGRESS_DPORT, EGRESS_DPORT, REFUSED_DPORT = 80, 8080, 81
INGRESS_PROXY, EGRESS_PROXY = 10080, 10081


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check,
                          timeout=timeout)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class TproxyTopology:
    def __init__(self, tag: str = "l7-proxy"):
        suffix = uuid.uuid4().hex[:5]
        self.client = f"{tag}-c-{suffix}"
        self.router = f"{tag}-r-{suffix}"
        self.server = f"{tag}-s-{suffix}"
        self._workers: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.veth_c = f"l7c{suffix}"
        self.veth_s = f"l7s{suffix}"

    def ns(self, name: str, *args: str, check: bool = True,
           timeout: float = 30) -> subprocess.CompletedProcess:
        return sh("nsenter", f"--net=/run/netns/{name}", *args, check=check, timeout=timeout)

    def up(self) -> TproxyTopology:
        for name in (self.client, self.router, self.server):
            sh("ip", "netns", "add", name)
            self.ns(name, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", self.veth_c, "netns", self.client, "type", "veth",
           "peer", "name", "eth-c", "netns", self.router)
        sh("ip", "link", "add", self.veth_s, "netns", self.server, "type", "veth",
           "peer", "name", "eth-s", "netns", self.router)
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", self.veth_c)
        self.ns(self.client, "ip", "link", "set", self.veth_c, "up")
        self.ns(self.client, "ip", "route", "add", "default", "via", ROUTER_CLIENT_IP)
        self.ns(self.server, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", self.veth_s)
        self.ns(self.server, "ip", "link", "set", self.veth_s, "up")
        self.ns(self.server, "ip", "route", "add", "default", "via", ROUTER_SERVER_IP)
        self.ns(self.router, "ip", "addr", "add", f"{ROUTER_CLIENT_IP}/24", "dev", "eth-c")
        self.ns(self.router, "ip", "addr", "add", f"{ROUTER_SERVER_IP}/24", "dev", "eth-s")
        self.ns(self.router, "ip", "link", "set", "eth-c", "up")
        self.ns(self.router, "ip", "link", "set", "eth-s", "up")
        self.ns(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # TPROXY in the router netns only: the original destination stays the socket's
        # local address, as with the datapath's redirect
        self.ns(self.router, "ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
        self.ns(self.router, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                "table", "100")
        for dport, proxy_port in ((INGRESS_DPORT, INGRESS_PROXY), (EGRESS_DPORT, EGRESS_PROXY),
                                  (REFUSED_DPORT, INGRESS_PROXY)):
            self.ns(self.router, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "eth-c",
                    "-p", "tcp", "--dport", str(dport), "-j", "TPROXY", "--on-port",
                    str(proxy_port), "--tproxy-mark", "0x1/0x1")
        return self

    def down(self) -> None:
        for pool in self._workers.values():
            pool.shutdown(wait=False)
        for name in (self.client, self.router, self.server):
            sh("ip", "netns", "del", name, check=False)

    def worker(self, name: str) -> concurrent.futures.ThreadPoolExecutor:
        if name not in self._workers:
            self._workers[name] = concurrent.futures.ThreadPoolExecutor(
                1, initializer=_setns, initargs=(f"/run/netns/{name}",))
        return self._workers[name]

    def socket_in(self, name: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside netns `name` (it stays there whichever thread uses it)."""
        return self.worker(name).submit(socket.socket, socket.AF_INET, kind).result()

    def connect(self, port: int = INGRESS_DPORT, timeout: float = 10) -> socket.socket:
        sock = self.socket_in(self.client)
        sock.settimeout(timeout)
        sock.connect((SERVER_IP, port))
        return sock
