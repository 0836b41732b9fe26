"""A local lab: nodes and pods as network namespaces on this host, one pylium agent per node.

`Lab` is the facade `pylium lab ...`, the demo and the tests drive; each part reads alone:

- `topology`  namespaces, the underlay bridge, the world (the picture is there)
- `kvstore`   the store the node agents share: one embedded file, or an etcd in its netns
- `agents`    each node's agent: config file, process, readiness, static routing entries
- `pods`      pods (endpoints wired by their node's agent) and servers run in them
- `state`     the state file that records every resource before it is made, so `down`
              removes exactly what `up` made, even after an `up` that failed half way
- `processes` stopping what the lab started, and only that"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from pylium.agent.client import AgentClient
from pylium.errors import UserError
from pylium.l7.proxy import stop_running
from pylium.lab.agents import Agents
from pylium.lab.kvstore import KVSTORES, LabKVStore
from pylium.lab.pods import DEMO_POLICIES, DEMO_SERVICES, DEMO_SETTINGS, DEMOS, Pods
from pylium.lab.processes import in_netns, stop_in_netns, stop_process
from pylium.lab.state import DEFAULT_NAME, STATE_ROOT, LabState, State
from pylium.lab.topology import Topology

__all__ = ["DEFAULT_NAME", "STATE_ROOT", "Lab"]

log = logging.getLogger(__name__)


class Lab:
    def __init__(self, name: str = DEFAULT_NAME):
        if not name or len(name) > 8 or not name.replace("-", "").isalnum():
            raise UserError(f"lab name {name!r}: 1-8 letters, digits or '-'")
        self.name = name
        self._state = LabState(name)
        self.state_file = self._state.path
        self.topology = Topology(self._state)
        self.kvstore = LabKVStore(self._state, self.topology)
        self.agents = Agents(self._state)
        self.pods = Pods(self._state, self.topology, self.agents)

    def load(self) -> State | None:
        return self._state.load()

    def ns(self, what: str) -> str:
        return self.topology.ns(what)

    # up / down -----------------------------------------------------------------------------
    def up(self, nodes: int = 1, demo: str | None = None,
           agent_settings: dict[str, Any] | None = None,
           routing: str | None = None, kvstore: str = "embedded") -> dict[str, Any]:
        if os.geteuid() != 0:
            raise UserError("the lab creates network namespaces and loads BPF: run it as root")
        if self.load() is not None:
            raise UserError(f"lab {self.name} is already up (state in {self.state_file}); "
                            "run `pylium lab down` first")
        if not 1 <= nodes <= 8:
            raise UserError(f"--nodes: {nodes} outside 1..8")
        if demo is not None and demo not in DEMOS:
            raise UserError(f"--demo: unknown demo {demo!r} (known: {', '.join(DEMOS)})")
        if kvstore not in KVSTORES:
            raise UserError(f"--kvstore: {kvstore!r} is not one of {', '.join(KVSTORES)}")
        if routing is not None:
            from pylium.plugins import make_plugin_manager

            modes = make_plugin_manager().capabilities("routing")
            if routing not in modes:
                raise UserError(f"--routing: {routing!r} is not an installed routing mode "
                                f"(installed: {', '.join(modes)})")
        state = self._state.new()
        settings = {**DEMO_SETTINGS.get(demo or "", {}), **(agent_settings or {})}
        if routing is not None:
            state["routing"] = routing
            settings.setdefault("routing_mode", routing)
        self._state.save(state)
        try:
            self.topology.make_underlay(state)
            settings.update(self.kvstore.make(state, kvstore, nodes, settings))
            for index in range(1, nodes + 1):
                self.agents.add(state, self.topology.make_node(state, index), settings)
            for pod in DEMOS.get(demo or "", ()):
                self.pods.add(state, pod["name"], pod["labels"], server=pod.get("server"))
            for svc in DEMO_SERVICES.get(demo or "", ()):
                self._add_service(state, svc)
            if demo in DEMO_POLICIES:
                self._import_example_policy(DEMO_POLICIES[demo])
        except BaseException:
            log.error("lab up failed; tearing down what was made")
            self.down()
            raise
        return self.status()

    def _add_service(self, state: State, svc: dict[str, Any]) -> None:
        """A demo's service over its pods, through the first node's agent (the KV store
        carries it to every node); kept in the lab state for `lab status`."""
        backends = [f"{self._state.pod(state, pod)['ip']}:{svc['target_port']}"
                    for pod in svc["backends"]]
        got = AgentClient(self._state.node(state)["socket"]).put(
            f"/v1/service/{svc['name']}", {"frontend": svc["frontend"], "backends": backends})
        state.setdefault("services", []).append(
            {"name": svc["name"], "id": got["spec"]["id"], "frontend": svc["frontend"],
             "backends": backends, "pods": list(svc["backends"])})
        self._state.save(state)

    def _import_example_policy(self, file_name: str) -> None:
        """Import one of the project's example policies (package data) on the first node."""
        text = (resources.files("pylium.lab") / "example_policies" / file_name).read_text()
        self.client().post("/v1/policy", {"text": text, "name": file_name})

    def down(self) -> dict[str, Any]:
        """Remove everything the lab made: processes, netns (with their links), pins,
        state dirs, sockets and the state file. Safe to run twice."""
        state = self.load()
        if state is None:
            return {"removed": False}
        for proc in reversed(state.get("processes", [])):
            stop_process(proc["pid"], proc["match"])
        # L7 proxies outlive their agent on purpose (restarts keep connections); a lab
        # going away takes its nodes' proxies with it
        for node in state.get("nodes", []):
            for proxy_dir in Path(node["state_dir"]).glob("plugins/l7-*/proxy"):
                stop_running(proxy_dir)
        for netns in state.get("netns", []):
            stop_in_netns(netns)  # what lab processes left running there (wireguard-go)
        self.topology.teardown(state)
        for path in state.get("paths", []):
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        link = state.get("symlink")
        if link and Path(link).is_symlink():
            Path(link).unlink()
        self._state.remove()
        return {"removed": True, "netns": state.get("netns", [])}

    def status(self) -> dict[str, Any]:
        state = self._state.require()
        return {
            "name": self.name,
            "nodes": [{"name": n["name"], "ip": n["ip"], "netns": n["netns"],
                       "pod_cidr": n["pod_cidr"], "socket": n["socket"],
                       "agent_running": self.agents.running(n)}
                      for n in state["nodes"]],
            "pods": [{"name": p["name"], "node": p["node"], "ip": p["ip"],
                      "labels": p["labels"], "namespace": p["namespace"],
                      "endpoint_id": p["endpoint_id"], "netns": p["netns"]}
                     for p in state["pods"]],
            "world": state.get("world"),
            "kvstore": state.get("kvstore", {"backend": "embedded"}),
            "services": state.get("services", []),
        }

    # KV store ------------------------------------------------------------------------------
    def kvstore_start(self, state: State | None = None) -> None:
        """(Re)start the lab's etcd on the same address and data (after `kvstore_stop`)."""
        self.kvstore.start(state or self._state.require())

    def kvstore_stop(self, wipe: bool = False) -> None:
        """Stop the lab's etcd (an outage: agents go degraded until `kvstore_start`); `wipe`
        deletes its data too."""
        self.kvstore.stop(self._state.require(), wipe=wipe)

    # agents --------------------------------------------------------------------------------
    def node(self, name: str | None = None, state: State | None = None) -> dict[str, Any]:
        return self._state.node(state or self._state.require(), name)

    def client(self, node: str | None = None) -> AgentClient:
        return AgentClient(self.node(node)["socket"])

    def agent_command(self, node: dict[str, Any]) -> list[str]:
        return self.agents.command(node)

    def start_agent(self, node: dict[str, Any], state: State | None = None) -> int:
        """(Re)start a node's agent and wait until its API answers; returns its pid."""
        return self.agents.start(state or self._state.require(), node)

    # pods ----------------------------------------------------------------------------------
    def add_pod(self, name: str, labels: dict[str, str], node: str | None = None,
                namespace: str = "default", server: str | None = None,
                state: State | None = None) -> dict[str, Any]:
        """A pod netns wired as an endpoint by `node`'s agent (optionally running a server)."""
        return self.pods.add(state or self._state.require(), name, labels, node=node,
                             namespace=namespace, server=server)

    def remove_pod(self, name: str) -> None:
        self.pods.remove(self._state.require(), name)

    def pod(self, name: str, state: State | None = None) -> dict[str, Any]:
        return self._state.pod(state or self._state.require(), name)

    def start_server(self, target: str, argv: list[str], port: int) -> int:
        """Run a long-lived server (`argv`) in a pod's, node's or the world's netns, wait
        until it listens on TCP `port`; `down` stops it. Returns its pid."""
        state = self._state.require()
        return self.pods.start_server(state, self.topology.netns_of(state, target), argv, port)

    # exec ----------------------------------------------------------------------------------
    def exec_argv(self, target: str, argv: list[str]) -> list[str]:
        """`nsenter` into a pod's netns (or a node's / the world's, by name)."""
        netns = self.topology.netns_of(self._state.require(), target)
        if not argv:
            raise UserError("give a command after `--`")
        return in_netns(netns, argv)

    def exec(self, target: str, argv: list[str], timeout: float = 60.0,
             ) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(target, argv), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)
