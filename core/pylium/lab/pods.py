"""Pods: a namespace per pod, wired as an endpoint by its node's agent (the agent makes the
veth, the address and the BPF programs; the lab only asks), and long-lived servers run in
pods' (or nodes', or the world's) namespaces, such as the Star Wars demo's deathstar."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from pylium.agent.client import AgentClient
from pylium.datapath import netns as plumbing
from pylium.errors import PyliumError, UserError
from pylium.lab.agents import Agents
from pylium.lab.processes import in_netns, listening
from pylium.lab.state import LabState, State
from pylium.lab.topology import Topology

SERVER_START_TIMEOUT = 15.0

STARWARS_PODS: tuple[dict[str, Any], ...] = (
    {"name": "deathstar", "labels": {"org": "empire", "class": "deathstar"},
     "server": "deathstar"},
    {"name": "deathstar-2", "labels": {"org": "empire", "class": "deathstar"},
     "server": "deathstar"},
    {"name": "tiefighter", "labels": {"org": "empire", "class": "tiefighter"}},
    {"name": "xwing", "labels": {"org": "alliance", "class": "xwing"}},
)
DEMOS = {"starwars": STARWARS_PODS, "starwars-l7": STARWARS_PODS}
#: Cilium's Star Wars demo puts both deathstar replicas behind the `deathstar` ClusterIP;
#: `backends` name pods, each reached on `target_port`
STARWARS_SERVICES: tuple[dict[str, Any], ...] = (
    {"name": "default/deathstar", "frontend": "10.96.0.10:80/TCP",
     "backends": ("deathstar", "deathstar-2"), "target_port": 80},
)
DEMO_SERVICES = {"starwars": STARWARS_SERVICES, "starwars-l7": STARWARS_SERVICES}
#: what a demo adds to every node agent's config, and the example policy it imports
DEMO_SETTINGS: dict[str, dict[str, Any]] = {"starwars-l7": {"l7_parsers": ["http"]}}
DEMO_POLICIES: dict[str, str] = {"starwars-l7": "l7-rule1.yaml"}
#: `server=` names for `add`: the argv each runs in the pod, and the TCP port it listens on
SERVERS = {"deathstar": ([sys.executable, "-m", "pylium.lab.deathstar", "--port", "80"], 80)}


class Pods:
    def __init__(self, store: LabState, topology: Topology, agents: Agents):
        self.store = store
        self.topology = topology
        self.agents = agents
        self.name = store.name

    def add(self, state: State, name: str, labels: dict[str, str], node: str | None = None,
            namespace: str = "default", server: str | None = None) -> dict[str, Any]:
        """A pod netns wired as an endpoint by `node`'s agent (optionally running a server)."""
        if any(p["name"] == name for p in state["pods"]):
            raise UserError(f"pod {name} already exists in lab {self.name}")
        if server is not None and server not in SERVERS:
            raise UserError(f"unknown server {server!r} (known: {', '.join(SERVERS)})")
        target = self.store.node(state, node)
        netns = self.topology.add_netns(state, self.topology.ns(name))
        try:
            ep = AgentClient(target["socket"]).put(
                f"/v1/endpoint/{name}", {"namespace": namespace, "labels": labels,
                                         "netns": netns})
        except BaseException:
            # the agent refused (e.g. no identity while the KV store is down): the pod's
            # namespace goes too, so the same pod can be added again later
            self.topology.remove_netns(state, netns)
            raise
        pod = {"name": name, "node": target["name"], "netns": netns, "ip": ep["ipv4"],
               "namespace": namespace, "labels": labels, "endpoint_id": ep["id"]}
        if state.get("routing"):
            pod["identity"] = ep["identity"]
        state["pods"].append(pod)
        self.store.save(state)
        if state.get("routing") and len(state["nodes"]) > 1:
            self.agents.publish_pod(state, pod)
        if server is not None:
            argv, port = SERVERS[server]
            self.start_server(state, pod["netns"], argv, port)
        return pod

    def remove(self, state: State, name: str) -> None:
        """Delete the pod's endpoint at its agent, then its namespace."""
        pod = self.store.pod(state, name)
        try:
            AgentClient(self.store.node(state, pod["node"])["socket"]).delete(
                f"/v1/endpoint/{pod['endpoint_id']}")
        finally:
            self.topology.remove_netns(state, pod["netns"])
            state["pods"] = [p for p in state["pods"] if p["name"] != name]
            self.store.save(state)

    def start_server(self, state: State, netns: str, argv: list[str], port: int) -> int:
        """Run `argv` in `netns` and wait until it listens on TCP `port`; `down` stops it.
        Returns its pid."""
        proc = subprocess.Popen(in_netns(netns, argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        state["processes"].append({"pid": proc.pid, "match": " ".join(argv)})
        self.store.save(state)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PyliumError(f"server {argv} in {netns} exited with {proc.returncode}")
            if plumbing.run_in_netns(netns, lambda: listening(port)):
                return proc.pid
            time.sleep(0.05)
        raise PyliumError(f"server {argv} in {netns} did not listen on {port}")
