"""Agent component: the CNI conflist `05-pylium.conflist`, written into `cni_conf_dir` once
the agent's API answers on its socket — as Cilium writes its conflist when ready, so the
runtime never hands a pod to a plugin whose agent cannot serve it yet. Off unless
`cni_conf_dir` is set (the lab and tests do not touch any CNI config dir)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFLIST_NAME = "05-pylium.conflist"
NETWORK_NAME = "pylium"
PLUGIN_TYPE = "pylium-cni"
#: the version runtimes of today (libcni 1.1, containerd 1.6, CRI-O) read; newer libcni
#: picks the highest of `cniVersions` it knows and then also sends STATUS and GC (1.1.0)
CONF_VERSION = "1.0.0"
CONF_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
POLL_S = 0.05


def conflist(socket_path: str) -> dict[str, Any]:
    """The network configuration list the runtime reads."""
    return {"cniVersion": CONF_VERSION, "cniVersions": list(CONF_VERSIONS),
            "name": NETWORK_NAME,
            "plugins": [{"type": PLUGIN_TYPE, "socket": socket_path}]}


def write_conflist(conf_dir: Path, socket_path: str) -> Path:
    """Write the conflist atomically (a runtime never reads half a file)."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / CONFLIST_NAME
    tmp = conf_dir / f".{CONFLIST_NAME}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(conflist(socket_path), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _answers(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class CNIConfig:
    def __init__(self, conf_dir: Path, socket_path: str):
        self.conf_dir = conf_dir
        self.socket_path = socket_path
        self.written: Path | None = None

    async def write_when_ready(self) -> None:
        """The API starts listening after every component started: wait for it."""
        while not await asyncio.to_thread(_answers, self.socket_path):
            await asyncio.sleep(POLL_S)
        try:
            self.written = await asyncio.to_thread(write_conflist, self.conf_dir,
                                                   self.socket_path)
        except OSError as exc:
            log.error("cannot write the CNI conflist into %s: %s", self.conf_dir, exc)
            return
        log.info("CNI conflist written: %s", self.written)


async def start(daemon) -> CNIConfig | None:
    conf_dir = daemon.config.cni_conf_dir
    if not conf_dir:
        return None
    component = CNIConfig(Path(conf_dir), str(Path(daemon.config.socket).absolute()))
    daemon.spawn(component.write_when_ready())
    return component
