"""The WireGuard device of this node: Debian's `wireguard-go` (the official userspace
implementation; this kernel has no WireGuard module), its name, and this node's key pair.

wireguard-go runs detached in its own session: it must outlive agent restarts (traffic keeps
flowing while the agent is down, as with a kernel device). It stops when its link is deleted
(`teardown`) or its socket file is removed. Its control sockets share `/var/run/wireguard`
across every network namespace of the host, so two namespaces cannot both call their device
`pylium_wg0`: the first one to start gets the name, the others a name of their own (see
`choose_name`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

from pylium.datapath import netns as plumbing
from pylium.errors import PyliumError, UserError

from pylium_encryption_wireguard import uapi

DEFAULT_DEVICE = "pylium_wg0"
IFNAMSIZ = 15
START_TIMEOUT = 10.0


def link_exists(name: str) -> bool:
    """Is there a link called `name` in the agent's network namespace?"""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def netns_tag() -> str:
    """4 hex digits naming this network namespace among the host's live ones."""
    inode = os.stat("/proc/thread-self/ns/net").st_ino
    return hashlib.sha256(str(inode).encode()).hexdigest()[:4]


def taken_elsewhere(name: str) -> bool:
    """A live wireguard-go answers for `name`, but the link is not in this namespace."""
    return uapi.live(name) and not link_exists(name)


def choose_name(wanted: str, node: str, remembered: str, explicit: bool) -> str:
    """The device name: the one this node used before (kept across restarts), else
    `wanted`; when `wanted` is the default and another namespace on this host already has
    it (a lab: every node is a namespace of one host), `wg_<node>_<netns tag>`."""
    if remembered and (link_exists(remembered) or not taken_elsewhere(remembered)):
        return remembered
    if not taken_elsewhere(wanted):
        return wanted
    if explicit:
        raise UserError(f"plugin_options.wireguard.device: {wanted} is in use by another "
                        "network namespace on this host (wireguard-go's sockets share "
                        f"{uapi.SOCKET_DIR}): choose another name")
    fallback = f"wg_{node[:IFNAMSIZ - 8]}_{netns_tag()}"
    if taken_elsewhere(fallback):
        raise UserError(f"WireGuard device names {wanted} and {fallback} are both in use by "
                        "other network namespaces on this host: set "
                        "plugin_options.wireguard.device")
    return fallback


def wireguard_go() -> str:
    path = shutil.which("wireguard-go")
    if path is None:
        raise PyliumError("wireguard-go is not installed (Debian: apt-get install "
                          "--no-install-recommends wireguard-go wireguard-tools)")
    return path


def running(name: str) -> bool:
    """This namespace's device `name` exists and its wireguard-go answers."""
    return link_exists(name) and uapi.live(name)


def start(name: str, log_path: Path) -> None:
    """Start wireguard-go for `name` (it creates the TUN link and its socket, then detaches
    into its own session: this returns once both exist)."""
    if link_exists(name):
        # a link without a live daemon (killed wireguard-go): start afresh
        plumbing.delete_link(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WG_")}
    env["LOG_LEVEL"] = "error"
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.run([wireguard_go(), name], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log, env=env, timeout=START_TIMEOUT,
                                  start_new_session=True, check=False)
        except subprocess.TimeoutExpired:
            raise PyliumError(f"wireguard-go {name} did not start within "
                              f"{START_TIMEOUT:.0f}s (log: {log_path})") from None
    if proc.returncode != 0 or not running(name):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise PyliumError(f"wireguard-go {name} failed to start (exit {proc.returncode}): "
                          f"{tail[0]}")


# keys --------------------------------------------------------------------------------------
def _wg(args: list[str], stdin: str = "") -> str:
    wg = shutil.which("wg")
    if wg is None:
        raise PyliumError("wg is not installed (Debian: apt-get install "
                          "--no-install-recommends wireguard-tools)")
    proc = subprocess.run([wg, *args], input=stdin, capture_output=True, text=True,
                          timeout=10, check=False)
    if proc.returncode != 0:
        raise PyliumError(f"wg {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def public_key(private: str) -> str:
    return _wg(["pubkey"], private + "\n")


def write_key(path: Path, private: str) -> None:
    """Write a private key readable by root only (0600 from creation: never briefly
    world-readable), replacing any previous file atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(private + "\n")
    os.replace(tmp, path)


def load_or_create_key(path: Path) -> str:
    """This node's private key: kept in `path` across restarts, made on first use."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        private = path.read_text().strip()
        uapi.b64_to_hex(private)  # a damaged file is an error, never silently replaced
        return private
    private = _wg(["genkey"])
    write_key(path, private)
    return private


def new_private_key() -> str:
    return _wg(["genkey"])
