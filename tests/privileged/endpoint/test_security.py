"""A real agent's attack surface: its API socket is 0600 root, it listens on no TCP port
unless metrics are asked for (then on that one only, and no secret is served there), and
nothing under its bpffs pin root is writable by other users."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from .eplab import make_lab


def _tcp_listeners(netns: str, pid: int) -> list[str]:
    """Local addresses the process `pid` listens on (TCP) inside `netns`."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltnp"], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines() if f"pid={pid}," in line)


def _agent_pid(lab) -> int:
    return int(lab.node()["agent_pid"])


def _writable_by_others(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            if os.lstat(name).st_mode & stat.S_IWOTH:
                bad.append(name)
    return bad


def test_socket_listeners_and_pins_of_a_default_agent(fresh_lab):
    node = fresh_lab.node()
    fresh_lab.add_pod("p1", {"app": "p1"})  # an endpoint: its policy maps are pinned too
    sock = os.stat(node["socket"])
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert (sock.st_uid, sock.st_gid) == (0, 0)
    assert _tcp_listeners(node["netns"], _agent_pid(fresh_lab)) == []
    root = Path(node["bpffs_root"])
    assert any(root.rglob("*")), f"no pins under {root}"
    assert _writable_by_others(root) == []
    state = Path(node["state_dir"])
    assert _writable_by_others(state) == []


def test_metrics_is_the_only_tcp_listener_and_serves_no_secret():
    lab = make_lab(prometheus_serve_addr="127.0.0.1:19962")
    try:
        node = lab.node()
        assert _tcp_listeners(node["netns"], _agent_pid(lab)) == ["127.0.0.1:19962"]
        body = subprocess.run(["ip", "netns", "exec", node["netns"], "curl", "-s",
                               "http://127.0.0.1:19962/metrics"], capture_output=True,
                              text=True, check=True).stdout
        assert "pylium" in body
        lowered = body.lower()
        assert not any(word in lowered for word in ("private", "secret", "password",
                                                    "token", "encryption_key"))
    finally:
        lab.down()


