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
