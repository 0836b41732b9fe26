"""`make demo`: start an agent on embedded defaults (no servers), show what a user sees with
`pylium status`, `pylium plugins` and `pylium config view`, and stop it.

The foundation demo only. It does no networking: the Star Wars lab demo (pods in network
namespaces, policy enforced in BPF) replaces this body once the lab and datapath land."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYLIUM = Path(sys.executable).with_name("pylium")


def _pylium(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYLIUM), *args], capture_output=True, text=True, check=check)


def _show(title: str, *args: str) -> None:
    print(f"\n$ pylium {' '.join(args)}    # {title}", flush=True)
    print(_pylium(*args).stdout.rstrip(), flush=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pylium-demo-"))
    sock = workdir / "pylium.sock"
    print(f"starting `pylium agent` on embedded defaults (state and socket in {workdir})")
    agent = subprocess.Popen(
        [str(PYLIUM), "agent", "--socket", str(sock), "--state-dir", str(workdir / "state"),
         "--node-name", "demo-node", "--log-level", "warning"],
        env={k: v for k, v in os.environ.items() if not k.startswith("PYLIUM_")},
    )
    try:
        deadline = time.monotonic() + 60
        while _pylium("-H", str(sock), "status", check=False).returncode != 0:
            if agent.poll() is not None or time.monotonic() > deadline:
                print("the agent did not come up", file=sys.stderr)
                return 1
            time.sleep(0.2)
        _show("the agent answers on its 0600 unix socket", "-H", str(sock), "status")
        _show("every plugin, its distribution and whether config selects it", "plugins")
        _show("the effective configuration", "-H", str(sock), "config", "view")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nagent stopped. No traffic was sent: the networking demo (pods, policy in BPF) "
          "is not wired into `make demo` yet.")
    return 0 if agent.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
