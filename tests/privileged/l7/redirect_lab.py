"""Shared by the redirect tests: the test L7 plugin installed for a lab's agent, the
transparent test listener (the stand-in proxy) and small probes of the lab's agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pylium.datapath import netns as plumbing

from ..endpoint.eplab import api

HERE = Path(__file__).parent
INGRESS_PROXY, EGRESS_PROXY = 10080, 10081
PLUGIN_MODULE = "pylium_test_redirect_plugin"


def install_plugin(site: Path) -> None:
    """A dist-info + module on PYTHONPATH: the agent discovers the plugin like a pip install."""
    shutil.copy(HERE / "redirect_plugin.py", site / f"{PLUGIN_MODULE}.py")
    info = site / "pylium_test_redirect-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pylium-test-redirect\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pylium]\nredirecttest = {PLUGIN_MODULE}\n")


def listening(port: int) -> bool:
    """Does something accept TCP on `port` (in the calling thread's netns)?"""
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Listener:
    """The test proxy on one port in the node netns, started and stopped by pid."""

    def __init__(self, lab, port: int, identities: dict[str, int], log: Path,
                 egress_magic: bool = False):
        self.lab, self.port, self.log = lab, port, log
        self.log.write_text("")
        args = [f"{ip}={identity}" for ip, identity in identities.items()]
        if egress_magic:
            args.append("--egress-magic")
        self.pid = lab.start_server("node1", [sys.executable, str(HERE / "redirect_listener.py"),
                                              str(port), str(log), *args], port=port)

    def connections(self, wait_for: int = 0) -> list[dict]:
        """The connections logged so far (waiting up to 6 s until there are `wait_for`: an
        upstream connect that is dropped is logged when it times out)."""
        deadline = time.monotonic() + 6
        while True:
            seen = [json.loads(line) for line in self.log.read_text().splitlines()]
            if len(seen) >= wait_for or time.monotonic() > deadline:
                return seen
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        netns = self.lab.node("node1")["netns"]
        deadline = time.monotonic() + 5
        while plumbing.run_in_netns(netns, lambda: listening(self.port)):
            assert time.monotonic() < deadline, f"listener on {self.port} did not stop"
            time.sleep(0.05)


@contextmanager
def plugin_site() -> Iterator[Path]:
    """A temp dir holding the test plugin, on PYTHONPATH (lab agents inherit it) while open;
    listener logs go there too."""
    site = Path(tempfile.mkdtemp(prefix="pylium-l7-redirect-"))
    install_plugin(site)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), old) if p)
    try:
        yield site
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        shutil.rmtree(site, ignore_errors=True)


def pods(lab) -> dict[str, dict]:
    eps = {ep["name"]: ep for ep in api(lab).get("/v1/endpoint")}
    return {p["name"]: {**p, "identity": eps[p["name"]]["identity"]} for p in lab.status()["pods"]}


def land(lab, src: str, ip: str) -> subprocess.CompletedProcess:
    return lab.exec(src, ["curl", "-s", "-m", "3", "-X", "POST",
                          f"http://{ip}/v1/request-landing"], timeout=20)


def metric(lab, reason: int) -> int:
    return sum(m["packets"] for m in api(lab).get("/v1/bpf/metrics") if m["reason"] == reason)


def redirect_entries(lab, ep_id: int) -> list[dict]:
    return [e for e in api(lab).get(f"/v1/bpf/policy/{ep_id}")["entries"]
            if e["verdict"] == "redirect"]
