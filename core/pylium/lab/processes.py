"""Long-lived processes the lab starts in its namespaces (agents, etcd, servers): each leads
its own session and is recorded as `{pid, match}`, so a later `pylium lab down` (another
process) can stop it without killing an unrelated program that reused the pid."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from pylium.datapath import netns as plumbing


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """`argv` run inside the named network namespace."""
    return ["nsenter", f"--net={plumbing.netns_path(netns)}", "--", *argv]


def proc_alive(pid: int, needle: str) -> bool:
    """True if `pid` is running and its command line mentions `needle` (a pid reused by
    some other program is not ours to kill)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


def stop_process(pid: int, needle: str, timeout: float = 5.0) -> None:
    """SIGTERM the process group `pid` leads, SIGKILL after `timeout`; only if it is ours."""
    if not proc_alive(pid, needle):
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
            if not proc_alive(pid, needle):
                return
            time.sleep(0.05)


def stop_in_netns(netns: str, timeout: float = 5.0) -> list[int]:
    """Stop every process still inside the named namespace: daemons that outlive the
    process that started them on purpose (wireguard-go keeps a node's encryption up across
    agent restarts) would otherwise keep the namespace alive after `down`. Returns their
    pids."""
    try:
        target = os.stat(plumbing.netns_path(netns))
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in found:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                     and not _zombie(pid)]
            time.sleep(0.05)
        if not alive:
            break
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def listening(port: int) -> bool:
    """Is something listening on TCP `port` in this thread's netns?"""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
