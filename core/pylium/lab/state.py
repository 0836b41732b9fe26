"""The lab's state file and where the lab keeps things on the host.

Every resource (netns, process, path, socket symlink) is written to `<LAB_DIR>/<name>.json`
before it is created, so `down` removes exactly what `up` made, even after an `up` that
failed half way. The file is one JSON object:

    {"name", "netns": [...], "nodes": [{name, netns, ip, pod_cidr, socket, state_dir,
     bpffs_root, agent_pid}], "pods": [{name, node, netns, ip, namespace, labels,
     endpoint_id, identity?}], "processes": [{pid, match}], "paths": [...], "symlink",
     "world": {netns, ip, extra_ips}, "routing"?, "kvstore"?: {backend, netns, data_dir,
     endpoint, pid}}"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pylium.errors import UserError

RUN_DIR = Path("/var/run/pylium")
LAB_DIR = RUN_DIR / "lab"
STATE_ROOT = Path("/var/lib/pylium/lab")
BPFFS_ROOT = Path("/sys/fs/bpf/pylium")
#: `pylium lab` without `--name`
DEFAULT_NAME = "pyl"

State = dict[str, Any]


class LabState:
    """Reads and atomically rewrites one lab's state file; looks nodes and pods up in it."""

    def __init__(self, name: str):
        self.name = name
        self.path = LAB_DIR / f"{name}.json"

    def new(self) -> State:
        return {"name": self.name, "netns": [], "nodes": [], "pods": [], "processes": [],
                "paths": [], "symlink": None}

    def load(self) -> State | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: State) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)

    def require(self) -> State:
        state = self.load()
        if state is None:
            raise UserError(f"lab {self.name} is not up (run `pylium lab up`)")
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def node(self, state: State, name: str | None = None) -> dict[str, Any]:
        """The node called `name` (None: the first)."""
        for node in state["nodes"]:
            if name in (None, node["name"]):
                return node
        raise UserError(f"no node {name!r} in lab {self.name}")

    def pod(self, state: State, name: str) -> dict[str, Any]:
        for pod in state["pods"]:
            if pod["name"] == name:
                return pod
        known = ", ".join(p["name"] for p in state["pods"]) or "none"
        raise UserError(f"no pod {name!r} in lab {self.name} (pods: {known})")
