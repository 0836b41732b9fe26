"""A local lab: nodes and pods as network namespaces on this host, one pylium agent per node.

Topology (for lab name `pyl`; every name starts with the lab name, so labs never collide):

    pyl-underlay (netns)  bridge br0 ─┬─ n1 ── eth0 pyl-node1 (192.168.100.11, agent inside)
                                      ├─ n2 ── eth0 pyl-node2 (192.168.100.12)  [--nodes 2]
                                      └─ world ── eth0 pyl-world (192.168.100.1,
                                                     198.51.100.10 and .20 on lo)
    pyl-node1: ip_forward on, default route via the world; pods' /32 routes on lxc* veths
    pyl-<pod>: eth0 with the pod IP (wired by the node's agent through its endpoint API)

The world namespace stands for "outside the cluster": nodes route there by default and it
routes each node's pod CIDR back to that node. Traffic never leaves namespaces the lab made;
the root namespace's interfaces and routes are not touched. The underlay bridge is where the
routing mode (`--routing vxlan|geneve|native`) carries pod traffic between nodes; with one
node nothing crosses it but world traffic. The world does not forward between nodes, so
with `--nodes 2` and no routing mode, pods on different nodes do not reach each other (each
node's pods do reach the world, and the world reaches them). With a routing mode, agents
learn the other nodes and their pods from the shared KV store (the cluster component);
agents without one get static entries from the lab (`/v1/routing/nodes`, `/ipcache`).

Every resource is written to the lab's state file before it is created, so `down` removes
exactly what `up` made, even after an `up` that failed half way."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pylium.cli.client import AgentClient
from pylium.datapath import netns as plumbing
from pylium.errors import AgentUnreachable, PyliumError, UserError

log = logging.getLogger(__name__)

RUN_DIR = Path("/var/run/pylium")
LAB_DIR = RUN_DIR / "lab"
STATE_ROOT = Path("/var/lib/pylium/lab")
BPFFS_ROOT = Path("/sys/fs/bpf/pylium")
DEFAULT_SOCKET = RUN_DIR / "pylium.sock"
UNDERLAY_PREFIX = "192.168.100."
WORLD_IP = UNDERLAY_PREFIX + "1"
#: addresses "in the world" for CIDR-rule tests (TEST-NET-2), on the world's loopback
WORLD_EXTRA_IPS = ("198.51.100.10", "198.51.100.20")
AGENT_START_TIMEOUT = 60.0
DEFAULT_NAME = "pyl"
#: `lab up --kvstore`: embedded (one SQLite file all node agents share) or a real etcd in the
#: lab's `<name>-kv` namespace on the underlay
KVSTORES = ("embedded", "etcd")
KVSTORE_IP = UNDERLAY_PREFIX + "2"
ETCD_PORTS = (2379, 2380)

STARWARS_PODS: tuple[dict[str, Any], ...] = (
    {"name": "deathstar", "labels": {"org": "empire", "class": "deathstar"},
     "server": "deathstar"},
    {"name": "tiefighter", "labels": {"org": "empire", "class": "tiefighter"}},
    {"name": "xwing", "labels": {"org": "alliance", "class": "xwing"}},
)
DEMOS = {"starwars": STARWARS_PODS}


def _proc_alive(pid: int, needle: str) -> bool:
    """True if `pid` is running and its command line mentions `needle` (a pid reused by
    some other program is not ours to kill)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


def _stop_process(pid: int, needle: str, timeout: float = 5.0) -> None:
    if not _proc_alive(pid, needle):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(pid, sig)  # each lab process leads its own session
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _proc_alive(pid, needle):
                return
            time.sleep(0.05)


class Lab:
    def __init__(self, name: str = DEFAULT_NAME):
        if not name or len(name) > 8 or not name.replace("-", "").isalnum():
            raise UserError(f"lab name {name!r}: 1-8 letters, digits or '-'")
        self.name = name
        self.state_file = LAB_DIR / f"{name}.json"

    # state ---------------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def _save(self, state: dict[str, Any]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    def _require(self) -> dict[str, Any]:
        state = self.load()
        if state is None:
            raise UserError(f"lab {self.name} is not up (run `pylium lab up`)")
        return state

    def ns(self, what: str) -> str:
        return f"{self.name}-{what}"

    # up ------------------------------------------------------------------------------------
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
        state: dict[str, Any] = {"name": self.name, "netns": [], "nodes": [], "pods": [],
                                 "processes": [], "paths": [], "symlink": None}
        settings = dict(agent_settings or {})
        if routing is not None:
            state["routing"] = routing
            settings.setdefault("routing_mode", routing)
        if (nodes > 1 and kvstore == "embedded" and settings.get("kvstore", "embedded")
                == "embedded" and "kvstore_options" not in settings):
            # one cluster: identities, nodes and endpoint IPs shared by every agent
            shared = STATE_ROOT / f"{self.name}-kvstore.sqlite3"
            settings["kvstore_options"] = {"path": str(shared)}
            state["paths"] += [str(shared), f"{shared}-wal", f"{shared}-shm"]
        self._save(state)
        try:
            self._make_underlay(state)
            if kvstore == "etcd":
                settings.update(self._make_etcd(state))
            for index in range(1, nodes + 1):
                self._make_node(state, index, settings)
            for pod in DEMOS.get(demo or "", ()):
                self.add_pod(pod["name"], pod["labels"], server=pod.get("server"), state=state)
        except BaseException:
            log.error("lab up failed; tearing down what was made")
            self.down()
            raise
        return self.status()

    def _add_netns(self, state: dict[str, Any], name: str) -> str:
        state["netns"].append(name)
        self._save(state)
        plumbing.create_netns(name)
        return name

    def _make_underlay(self, state: dict[str, Any]) -> None:
        underlay = self._add_netns(state, self.ns("underlay"))
        plumbing.create_bridge("br0", underlay)
        world = self._add_netns(state, self.ns("world"))
        plumbing.create_veth("world", underlay, "eth0", world)
        plumbing.set_link_up("world", underlay, master="br0")
        plumbing.add_address("eth0", f"{WORLD_IP}/24", world)
        for extra in WORLD_EXTRA_IPS:
            plumbing.add_address("lo", f"{extra}/32", world)
        state["world"] = {"netns": world, "ip": WORLD_IP, "extra_ips": list(WORLD_EXTRA_IPS)}
        self._save(state)

    # KV store ------------------------------------------------------------------------------
    def _etcd_server(self, state: dict[str, Any]):
        from pylium.kvstore.testing import EtcdServer

        kv = state["kvstore"]
        return EtcdServer(name=self.ns("etcd"), data_dir=Path(kv["data_dir"]), host=KVSTORE_IP,
                          netns=kv["netns"], client_port=ETCD_PORTS[0],
                          peer_port=ETCD_PORTS[1])

    def _make_etcd(self, state: dict[str, Any]) -> dict[str, Any]:
        """A real etcd in its own namespace on the underlay (KVSTORE_IP), reachable from every
        node; returns the agent settings that select it."""
        netns = self._add_netns(state, self.ns("kv"))
        plumbing.create_veth("kv", self.ns("underlay"), "eth0", netns)
        plumbing.set_link_up("kv", self.ns("underlay"), master="br0")
        plumbing.add_address("eth0", f"{KVSTORE_IP}/24", netns)
        data_dir = STATE_ROOT / self.ns("etcd")
        shutil.rmtree(data_dir, ignore_errors=True)
        state["paths"].append(str(data_dir))
        state["kvstore"] = {"backend": "etcd", "netns": netns, "data_dir": str(data_dir),
                            "endpoint": f"http://{KVSTORE_IP}:{ETCD_PORTS[0]}"}
        self._save(state)
        self.kvstore_start(state)
        return {"kvstore": "etcd", "kvstore_options": {"endpoints": [state["kvstore"]["endpoint"]]}}

    def kvstore_start(self, state: dict[str, Any] | None = None) -> None:
        """(Re)start the lab's etcd on the same address and data (after `kvstore_stop`)."""
        state = state or self._require()
        if state.get("kvstore", {}).get("backend") != "etcd":
            raise UserError(f"lab {self.name} runs no etcd (use `lab up --kvstore etcd`)")
        server = self._etcd_server(state)
        server.start()
        state["kvstore"]["pid"] = server.process.pid
        state["processes"].append({"pid": server.process.pid,
                                   "match": state["kvstore"]["data_dir"]})
        self._save(state)

    def kvstore_stop(self) -> None:
        """Stop the lab's etcd (an outage: agents go degraded until `kvstore_start`)."""
        state = self._require()
        kv = state.get("kvstore", {})
        if kv.get("backend") != "etcd":
            raise UserError(f"lab {self.name} runs no etcd (use `lab up --kvstore etcd`)")
        _stop_process(kv.get("pid", 0), kv["data_dir"])

    def _make_node(self, state: dict[str, Any], index: int, settings: dict[str, Any]) -> None:
        name = f"node{index}"
        netns = self._add_netns(state, self.ns(name))
        ip = f"{UNDERLAY_PREFIX}{10 + index}"
        pod_cidr = f"10.200.{index}.0/24"
        plumbing.create_veth(f"n{index}", self.ns("underlay"), "eth0", netns)
        plumbing.set_link_up(f"n{index}", self.ns("underlay"), master="br0")
        plumbing.add_address("eth0", f"{ip}/24", netns)
        plumbing.add_route("default", netns, gateway=WORLD_IP)
        plumbing.write_sysctl(netns, "net.ipv4.ip_forward", "1")
        plumbing.add_route(pod_cidr, self.ns("world"), gateway=ip)
        node = {"name": name, "netns": netns, "ip": ip, "pod_cidr": pod_cidr,
                "socket": str(RUN_DIR / f"{self.name}-{name}.sock"),
                "state_dir": str(STATE_ROOT / f"{self.name}-{name}"),
                "bpffs_root": str(BPFFS_ROOT / f"{self.name}-{name}")}
        state["nodes"].append(node)
        state["paths"] += [node["socket"], node["state_dir"], node["bpffs_root"]]
        self._save(state)
        self._start_agent(state, node, settings)
        if (index == 1 and self.name == DEFAULT_NAME and not DEFAULT_SOCKET.exists()
                and not DEFAULT_SOCKET.is_symlink()):
            # `pylium endpoint list` etc. reach the lab's first agent without -H
            DEFAULT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            state["symlink"] = str(DEFAULT_SOCKET)
            self._save(state)
            DEFAULT_SOCKET.symlink_to(node["socket"])

    def agent_command(self, node: dict[str, Any]) -> list[str]:
        return ["nsenter", f"--net={plumbing.netns_path(node['netns'])}", "--",
                str(Path(sys.executable).with_name("pylium")), "agent",
                "--config", str(Path(node["state_dir"]) / "config.yaml")]

    def _start_agent(self, state: dict[str, Any], node: dict[str, Any],
                     settings: dict[str, Any]) -> None:
        state_dir = Path(node["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        config = {"node_name": node["name"], "socket": node["socket"],
                  "state_dir": node["state_dir"], "bpffs_root": node["bpffs_root"],
                  "pod_cidr": node["pod_cidr"], "node_ip": node["ip"], **settings}
        (state_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.start_agent(node, state)

    def start_agent(self, node: dict[str, Any], state: dict[str, Any] | None = None) -> int:
        """(Re)start a node's agent and wait until its API answers; returns its pid."""
        state = state or self._require()
        log_path = Path(node["state_dir"]) / "agent.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(self.agent_command(node), stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=_agent_environment())
        for n in state["nodes"]:
            if n["name"] == node["name"]:
                n["agent_pid"] = proc.pid
        state["processes"].append({"pid": proc.pid, "match": node["state_dir"]})
        self._save(state)
        client = AgentClient(node["socket"], timeout=5)
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PyliumError(f"agent on {node['name']} exited with {proc.returncode}:\n"
                                  + _tail(log_path))
            try:
                status = client.get("/v1/status")
                if state.get("routing") and "cluster" not in status.get("components", ()):
                    self._announce_nodes(state, node)
                return proc.pid
            except (AgentUnreachable, UserError):
                time.sleep(0.1)
        raise PyliumError(f"agent on {node['name']} did not answer within "
                          f"{AGENT_START_TIMEOUT:.0f}s:\n" + _tail(log_path))

    # routing without a node registry -------------------------------------------------------
    def _announce_nodes(self, state: dict[str, Any], node: dict[str, Any]) -> None:
        """Static node entries: tell `node`'s agent about every other node, and them about
        it (agents that run the cluster's node registry learn this from the KV store)."""
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
        # remote pods this (possibly restarted) node's ipcache should have
        for pod in state["pods"]:
            if pod["node"] != node["name"] and "identity" in pod:
                client.put("/v1/routing/ipcache", self._ipcache_entry(state, pod))

    def _ipcache_entry(self, state: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
        return {"cidr": f"{pod['ip']}/32", "identity": pod["identity"],
                "tunnel_endpoint": self.node(pod["node"], state)["ip"]}

    def _publish_pod(self, state: dict[str, Any], pod: dict[str, Any]) -> None:
        for other in state["nodes"]:
            if other["name"] == pod["node"]:
                continue
            client = AgentClient(other["socket"])
            if "cluster" in client.get("/v1/status").get("components", ()):
                continue
            client.put("/v1/routing/ipcache", self._ipcache_entry(state, pod))

    # pods ----------------------------------------------------------------------------------
    def node(self, name: str | None = None, state: dict[str, Any] | None = None) -> dict:
        state = state or self._require()
        for node in state["nodes"]:
            if name in (None, node["name"]):
                return node
        raise UserError(f"no node {name!r} in lab {self.name}")

    def client(self, node: str | None = None) -> AgentClient:
        return AgentClient(self.node(node)["socket"])

    def add_pod(self, name: str, labels: dict[str, str], node: str | None = None,
                namespace: str = "default", server: str | None = None,
                state: dict[str, Any] | None = None) -> dict[str, Any]:
        """A pod netns wired as an endpoint by `node`'s agent (optionally running a server)."""
        state = state or self._require()
        if any(p["name"] == name for p in state["pods"]):
            raise UserError(f"pod {name} already exists in lab {self.name}")
        target = self.node(node, state)
        netns = self._add_netns(state, self.ns(name))
        ep = AgentClient(target["socket"]).put(
            f"/v1/endpoint/{name}", {"namespace": namespace, "labels": labels, "netns": netns})
        pod = {"name": name, "node": target["name"], "netns": netns, "ip": ep["ipv4"],
               "namespace": namespace, "labels": labels, "endpoint_id": ep["id"]}
        if state.get("routing"):
            pod["identity"] = ep["identity"]
        state["pods"].append(pod)
        self._save(state)
        if state.get("routing") and len(state["nodes"]) > 1:
            self._publish_pod(state, pod)
        if server == "deathstar":
            self._start_server(state, pod["netns"], [sys.executable, "-m",
                                                     "pylium.lab.deathstar", "--port", "80"],
                               port=80)
        return pod

    def start_server(self, target: str, argv: list[str], port: int) -> int:
        """Run a long-lived server (`argv`) in a pod's, node's or the world's netns, wait
        until it listens on TCP `port`; `down` stops it. Returns its pid."""
        netns = self.exec_argv(target, ["true"])[1].split("=", 1)[1]
        return self._start_server(self._require(), netns, argv, port)

    def _start_server(self, state: dict[str, Any], netns: str, argv: list[str],
                      port: int) -> int:
        cmd = ["nsenter", f"--net={plumbing.netns_path(netns)}", "--", *argv]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        state["processes"].append({"pid": proc.pid, "match": " ".join(argv)})
        self._save(state)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PyliumError(f"server {argv} in {netns} exited with {proc.returncode}")
            if plumbing.run_in_netns(netns, lambda: _listening(port)):
                return proc.pid
            time.sleep(0.05)
        raise PyliumError(f"server {argv} in {netns} did not listen on {port}")

    def remove_pod(self, name: str) -> None:
        state = self._require()
        pod = self.pod(name, state)
        try:
            AgentClient(self.node(pod["node"], state)["socket"]).delete(
                f"/v1/endpoint/{pod['endpoint_id']}")
        finally:
            plumbing.remove_netns(pod["netns"])
            state["pods"] = [p for p in state["pods"] if p["name"] != name]
            state["netns"] = [n for n in state["netns"] if n != pod["netns"]]
            self._save(state)

    def pod(self, name: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
        state = state or self._require()
        for pod in state["pods"]:
            if pod["name"] == name:
                return pod
        known = ", ".join(p["name"] for p in state["pods"]) or "none"
        raise UserError(f"no pod {name!r} in lab {self.name} (pods: {known})")

    def exec_argv(self, target: str, argv: list[str]) -> list[str]:
        """`nsenter` into a pod's netns (or a node's / the world's, by name)."""
        state = self._require()
        names = {p["name"]: p["netns"] for p in state["pods"]}
        names.update({n["name"]: n["netns"] for n in state["nodes"]})
        names["world"] = state["world"]["netns"]
        if target not in names:
            raise UserError(f"no pod or node {target!r} in lab {self.name} "
                            f"(known: {', '.join(names)})")
        if not argv:
            raise UserError("give a command after `--`")
        return ["nsenter", f"--net={plumbing.netns_path(names[target])}", "--", *argv]

    def exec(self, target: str, argv: list[str], timeout: float = 60.0,
             ) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(target, argv), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    # status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self._require()
        return {
            "name": self.name,
            "nodes": [{"name": n["name"], "ip": n["ip"], "netns": n["netns"],
                       "pod_cidr": n["pod_cidr"], "socket": n["socket"],
                       "agent_running": _proc_alive(n.get("agent_pid", 0), n["state_dir"])}
                      for n in state["nodes"]],
            "pods": [{"name": p["name"], "node": p["node"], "ip": p["ip"],
                      "labels": p["labels"], "namespace": p["namespace"],
                      "endpoint_id": p["endpoint_id"], "netns": p["netns"]}
                     for p in state["pods"]],
            "world": state.get("world"),
            "kvstore": state.get("kvstore", {"backend": "embedded"}),
        }

    # down ----------------------------------------------------------------------------------
    def down(self) -> dict[str, Any]:
        """Remove everything the lab made: processes, netns (with their links), pins,
        state dirs, sockets and the state file. Safe to run twice."""
        state = self.load()
        if state is None:
            return {"removed": False}
        for proc in reversed(state.get("processes", [])):
            _stop_process(proc["pid"], proc["match"])
        for name in reversed(state.get("netns", [])):
            try:
                plumbing.remove_netns(name)
            except OSError as exc:
                log.error("removing netns %s: %s", name, exc)
        for path in state.get("paths", []):
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        link = state.get("symlink")
        if link and Path(link).is_symlink():
            Path(link).unlink()
        self.state_file.unlink(missing_ok=True)
        return {"removed": True, "netns": state.get("netns", [])}


def _listening(port: int) -> bool:
    """Is something listening on TCP `port` in this thread's netns?"""
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no agent log)"


def _agent_environment() -> dict[str, str]:
    """The lab's agents take their whole config from the file the lab writes: `PYLIUM_*`
    settings in the caller's environment (e.g. `PYLIUM_SOCKET` meant for the CLI) would
    override it (env beats file) and put every node's agent on one socket or pin root."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYLIUM_") or k == "PYLIUM_TRACE_PLUGINS"}
