"""Helpers for CNI tests: a lab node (a netns running a real agent) and the real
`pylium-cni` executable run the way a container runtime runs it — exec'd inside the node's
netns (`nsenter --net=`), `CNI_*` variables in its environment, the network config on
stdin — next to the reference `bridge` + `host-local` plugins (Debian's
containernetworking-plugins in /usr/lib/cni) run the same way in a netns of their own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pylium.datapath import netns as plumbing
from pylium.lab.lab import Lab

#: the transports a runtime may exec: the Python console script and the native one
PLUGIN = str(Path(sys.executable).with_name("pylium-cni"))
TRANSPORTS = ("native", "python")
REFERENCE_DIR = "/usr/lib/cni"


def run_plugin(argv: list[str], node_netns: str, env: dict[str, str],
               stdin: bytes | str, timeout: float = 120.0) -> tuple[int, Any, str]:
    """Exec a CNI plugin inside `node_netns`: (exit code, stdout as JSON or None, stderr)."""
    if isinstance(stdin, str):
        stdin = stdin.encode()
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.run(["nsenter", f"--net={plumbing.netns_path(node_netns)}", "--", *argv],
                          input=stdin, capture_output=True, env={**base, **env},
                          timeout=timeout, check=False)
    out = proc.stdout.decode().strip()
    return proc.returncode, json.loads(out) if out else None, proc.stderr.decode()


def cni_env(command: str, container_id: str = "", netns: str = "", ifname: str = "eth0",
            path: str = REFERENCE_DIR, args: str = "") -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_PATH": path}
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = str(plumbing.netns_path(netns))
    if ifname:
        env["CNI_IFNAME"] = ifname
    if args:
        env["CNI_ARGS"] = args
    return env


class PyliumCNI:
    """A lab node with its agent; `call` runs pylium-cni (the `transport`) against it. The
    native transport is built for the lab: a config naming no usable socket goes to the lab
    agent (as it goes to the default agent socket on a node), which reports the problem."""

    def __init__(self, transport: str = "python", **agent_settings):
        subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
                       shell=True, check=True)
        self.lab = Lab("c" + secrets.token_hex(3))
        self.bin_dir = tempfile.mkdtemp(prefix=f"{self.lab.name}-bin-")
        self.pods: list[str] = []
        self.lab.up(agent_settings=agent_settings)
        self.node = self.lab.node()
        self.plugin = PLUGIN
        if transport == "native":
            from pylium.cni import native

            self.plugin = str(native.build(Path(self.bin_dir) / "pylium-cni",
                                           default_socket=self.node["socket"]))

    def conf(self, version: str = "1.0.0", **extra) -> dict[str, Any]:
        """The plugin's config as a runtime hands it over from our conflist."""
        return {"cniVersion": version, "name": "pylium", "type": "pylium-cni",
                "socket": self.node["socket"], **extra}

    def call(self, env: dict[str, str], conf: dict[str, Any] | str | bytes,
             timeout: float = 120.0) -> tuple[int, Any, str]:
        stdin = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        return run_plugin([self.plugin], self.node["netns"], env, stdin, timeout)

    def pod_netns(self, tag: str) -> str:
        """A fresh pod netns (removed by `down`)."""
        name = f"{self.lab.name}-{tag}"
        plumbing.create_netns(name)
        self.pods.append(name)
        return name

    def api(self):
        return self.lab.client()

    def down(self) -> None:
        try:
            self.lab.down()
        finally:
            for name in self.pods:
                plumbing.remove_netns(name)
            shutil.rmtree(self.bin_dir, ignore_errors=True)


class ReferenceCNI:
    """The reference plugins: `bridge` with `host-local` IPAM in a node netns of their own
    (bridge, veths and IPAM state all inside it or a temp dir)."""

    def __init__(self, subnet: str = "10.77.0.0/24"):
        self.name = "r" + secrets.token_hex(3)
        self.node_netns = f"{self.name}-node"
        plumbing.create_netns(self.node_netns)
        self.data_dir = tempfile.mkdtemp(prefix=f"cni-{self.name}-")
        self.subnet = subnet
        self.pods: list[str] = []

    def conf(self, version: str = "1.0.0") -> dict[str, Any]:
        return {"cniVersion": version, "name": f"ref{self.name}", "type": "bridge",
                "bridge": f"br{self.name}", "isGateway": True,
                "ipam": {"type": "host-local", "subnet": self.subnet, "dataDir": self.data_dir,
                         "routes": [{"dst": "0.0.0.0/0"}]},
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}}

    def call(self, env: dict[str, str], conf: dict[str, Any] | str | bytes,
             timeout: float = 120.0) -> tuple[int, Any, str]:
        stdin = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        return run_plugin([f"{REFERENCE_DIR}/bridge"], self.node_netns, env, stdin, timeout)

    def pod_netns(self, tag: str) -> str:
        """A fresh pod netns (numbered: tests run once per pylium-cni transport)."""
        name = f"{self.name}-{tag}{len(self.pods)}"
        plumbing.create_netns(name)
        self.pods.append(name)
        return name

    def allocated(self) -> list[str]:
        """Addresses host-local still holds (its one-file-per-IP state)."""
        root = Path(self.data_dir)
        return sorted(p.name for d in root.iterdir() if d.is_dir() for p in d.iterdir()
                      if p.name[0].isdigit()) if root.exists() else []

    def down(self) -> None:
        for name in self.pods:
            plumbing.remove_netns(name)
        plumbing.remove_netns(self.node_netns)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def shape(value: Any) -> Any:
    """The structure of a JSON value: objects → their keys with the shapes of their
    values, lists → the set of their items' shapes, scalars → their type name."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        out: list = []
        for item in value:
            s = shape(item)
            if s not in out:
                out.append(s)
        return sorted(out, key=json.dumps)
    return type(value).__name__
