"""One etcd server process: the single place that knows etcd's command line, where its data
and log go, and when it counts as up. The lab runs one in its own network namespace (a
process that outlives `pylium lab up`); `pylium.kvstore.testing.EtcdServer` builds the tests'
loopback servers on it.

Layout under `base_dir`: `data/` (the member's data directory) and `etcd.log`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from pylium.errors import PyliumError

#: Debian's etcd-server; an absolute path so an `etcd` script in a venv cannot shadow it
DEBIAN_ETCD = "/usr/bin/etcd"


class EtcdProcess:
    """A single-member etcd cluster listening on `host` (inside `netns` when given).

    `detach` puts the process in its own session, so a Ctrl-C meant for the caller does not
    reach it and it keeps running after the caller exits (the lab stops it later by pid)."""

    def __init__(self, base_dir: Path, client_port: int, peer_port: int,
                 name: str = "pylium", binary: str | None = None, host: str = "127.0.0.1",
                 netns: str | None = None, detach: bool = False,
                 start_timeout: float = 20.0):
        self.binary = binary or DEBIAN_ETCD
        if not os.access(self.binary, os.X_OK):
            raise PyliumError(f"etcd binary {self.binary} not found (install etcd-server)")
        self.name = name
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.host = host
        self.netns = netns
        self.client_port = client_port
        self.peer_port = peer_port
        self.detach = detach
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
        enter = [] if self.netns is None else ["nsenter", f"--net={_netns_path(self.netns)}", "--"]
        return [
            *enter, self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new", "--initial-cluster-token", self.name,
        ]

    def start(self) -> EtcdProcess:
        """Start etcd (same data and ports as before, after a `stop`) and wait until its
        `/health` answers true."""
        if self.running:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            start_new_session=self.detach)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PyliumError(f"etcd exited with {self.process.returncode}: {self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise PyliumError(f"etcd did not become healthy in {self.start_timeout}s: "
                          f"{self.log_tail()}")

    def healthy(self) -> bool:
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. The data stays: `start()` brings the same member
        back on the same ports."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _netns_path(name: str) -> str:
    from pylium.datapath.netns import netns_path

    return netns_path(name)
