"""Deselecting encryption cleans up: an agent restarted without `encryption: wireguard`
removes the WireGuard device the previous run left (wireguard-go exits with it) and stops
steering into it, and keeps the node's key for a later re-selection. A one-node lab (real
node netns, real wireguard-go)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import yaml
from pylium.lab.lab import Lab
from pylium.lab.processes import stop_process

from ..datapath.netns_helpers import in_ns


def _wireguard_go_pids(device: str) -> list[int]:
    """Processes running `wireguard-go <device>` (read from /proc; nothing is signalled)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[0].endswith(b"wireguard-go") and argv[1] == device.encode():
            pids.append(int(entry.name))
    return pids


def _has_link(netns: str, name: str) -> bool:
    return in_ns(netns, "ip", "link", "show", "dev", name, check=False).returncode == 0


def _restart_without_encryption(lab: Lab, node: str) -> None:
    entry = lab.node(node)
    stop_process(entry["agent_pid"], entry["state_dir"])
    path = Path(entry["state_dir"]) / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.pop("encryption", None)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    lab.start_agent(lab.node(node))


def test_deselected_wireguard_leaves_no_device_and_no_wireguard_go():
    lab = Lab(f"td{uuid.uuid4().hex[:4]}")
    try:
        lab.up(nodes=1, routing="native", agent_settings={"encryption": "wireguard"})
        node = lab.node("node1")
        device = lab.client("node1").get("/v1/encrypt")["interface"]
        plugin_dir = Path(node["state_dir"]) / "plugins" / "encryption-wireguard"
        assert device and _has_link(node["netns"], device)
        assert _wireguard_go_pids(device)

        _restart_without_encryption(lab, "node1")
        deadline = time.monotonic() + 10
        while _wireguard_go_pids(device) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _has_link(node["netns"], device)
        assert not _wireguard_go_pids(device), "wireguard-go outlived its device"
        assert "encryption" not in lab.client("node1").get("/v1/status")["components"]
        assert not (plugin_dir / "device").exists()
        assert (plugin_dir / "private.key").exists()  # selecting it again keeps the key
    finally:
        lab.down()
