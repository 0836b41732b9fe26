"""One pylium agent per lab node: its config file, its process (in the node's namespace,
leading its own session), readiness (its API answers), and — for agents that run a routing
mode without the cluster's node registry — the static node and ipcache entries the lab hands
them through their API (`/v1/routing/nodes`, `/v1/routing/ipcache`). Agents with the cluster
component learn the same from the shared KV store instead."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pylium.agent.client import AgentClient
from pylium.errors import AgentUnreachable, PyliumError, UserError
from pylium.lab.processes import in_netns, log_tail, proc_alive
from pylium.lab.state import BPFFS_ROOT, DEFAULT_NAME, RUN_DIR, STATE_ROOT, LabState, State

log = logging.getLogger(__name__)

AGENT_START_TIMEOUT = 60.0
DEFAULT_SOCKET = RUN_DIR / "pylium.sock"


class Agents:
    def __init__(self, store: LabState):
        self.store = store
        self.name = store.name

    def add(self, state: State, node: dict[str, Any], settings: dict[str, Any]) -> None:
        """Give `node` (fresh from the topology) its agent: paths, config file, process."""
        node.update({"socket": str(RUN_DIR / f"{self.name}-{node['name']}.sock"),
                     "state_dir": str(STATE_ROOT / f"{self.name}-{node['name']}"),
                     "bpffs_root": str(BPFFS_ROOT / f"{self.name}-{node['name']}")})
        state["nodes"].append(node)
        state["paths"] += [node["socket"], node["state_dir"], node["bpffs_root"]]
        self.store.save(state)
        state_dir = Path(node["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        config = {"node_name": node["name"], "socket": node["socket"],
                  "state_dir": node["state_dir"], "bpffs_root": node["bpffs_root"],
                  "pod_cidr": node["pod_cidr"], "node_ip": node["ip"], **settings}
        (state_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.start(state, node)
        if (len(state["nodes"]) == 1 and self.name == DEFAULT_NAME
                and not DEFAULT_SOCKET.exists() and not DEFAULT_SOCKET.is_symlink()):
            # the default lab's first agent answers `pylium endpoint list` etc. without -H
            DEFAULT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            state["symlink"] = str(DEFAULT_SOCKET)
            self.store.save(state)
            DEFAULT_SOCKET.symlink_to(node["socket"])

    def command(self, node: dict[str, Any]) -> list[str]:
        return in_netns(node["netns"], [str(Path(sys.executable).with_name("pylium")), "agent",
                                        "--config", str(Path(node["state_dir"]) / "config.yaml")])

    def start(self, state: State, node: dict[str, Any]) -> int:
        """(Re)start a node's agent and wait until its API answers; returns its pid."""
        log_path = Path(node["state_dir"]) / "agent.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(self.command(node), stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=agent_environment())
        for n in state["nodes"]:
            if n["name"] == node["name"]:
                n["agent_pid"] = proc.pid
        state["processes"].append({"pid": proc.pid, "match": node["state_dir"]})
        self.store.save(state)
        client = AgentClient(node["socket"], timeout=5)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PyliumError(f"agent on {node['name']} exited with {proc.returncode}:\n"
                                  + log_tail(log_path))
            try:
                status = client.get("/v1/status")
                if state.get("routing") and "cluster" not in status.get("components", ()):
                    self._announce_node(state, node)
                return proc.pid
            except (AgentUnreachable, UserError):
                time.sleep(0.1)
        raise PyliumError(f"agent on {node['name']} did not answer within "
                          f"{AGENT_START_TIMEOUT:.0f}s:\n" + log_tail(log_path))

    @staticmethod
    def running(node: dict[str, Any]) -> bool:
        return proc_alive(node.get("agent_pid", 0), node["state_dir"])

    # routing without a node registry -------------------------------------------------------
    def _announce_node(self, state: State, node: dict[str, Any]) -> None:
        """Static node entries: tell `node`'s agent about every other node, and them about
        it; then hand it the remote pods its (possibly restarted) ipcache should have."""
        def entry(n):
            return {"ipv4": n["ip"], "pod_cidr": n["pod_cidr"]}

        client = AgentClient(node["socket"])
        for other in state["nodes"]:
            if other["name"] == node["name"] or not other.get("agent_pid"):
                continue
            client.put(f"/v1/routing/nodes/{other['name']}", entry(other))
            try:
                AgentClient(other["socket"]).put(f"/v1/routing/nodes/{node['name']}",
                                                 entry(node))
            except (AgentUnreachable, UserError) as exc:
                log.warning("node %s not told about %s: %s", other["name"], node["name"], exc)
        for pod in state["pods"]:
            if pod["node"] != node["name"] and "identity" in pod:
                client.put("/v1/routing/ipcache", self._ipcache_entry(state, pod))

    def publish_pod(self, state: State, pod: dict[str, Any]) -> None:
        """Tell the other nodes' agents (those without the cluster component) where `pod`
        lives."""
        for other in state["nodes"]:
            if other["name"] == pod["node"]:
                continue
            client = AgentClient(other["socket"])
            if "cluster" in client.get("/v1/status").get("components", ()):
                continue
            client.put("/v1/routing/ipcache", self._ipcache_entry(state, pod))

    def _ipcache_entry(self, state: State, pod: dict[str, Any]) -> dict[str, Any]:
        return {"cidr": f"{pod['ip']}/32", "identity": pod["identity"],
                "tunnel_endpoint": self.store.node(state, pod["node"])["ip"]}


def agent_environment() -> dict[str, str]:
    """The lab's agents take their whole config from the file the lab writes: `PYLIUM_*`
    settings in the caller's environment (e.g. `PYLIUM_SOCKET` meant for the CLI) would
    override it (env beats file) and put every node's agent on one socket or pin root."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYLIUM_") or k == "PYLIUM_TRACE_PLUGINS"}
