"""`pylium monitor` through a running agent: a denied ping shows up as a policy verdict and
a drop (the agent's flow component owns the ring buffer; the CLI follows its stream)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey

from .netns_helpers import in_ns

PODS = {"a": ("10.213.0.10", 1300), "b": ("10.213.0.11", 1301)}


def test_monitor_shows_the_drop_of_a_denied_ping(node, tmp_path):
    n = node("monitor", PODS)
    sock = str(tmp_path / "agent.sock")
    pylium = [str(Path(sys.executable).parent / "pylium")]
    agent = subprocess.Popen(["nsenter", f"--net=/run/netns/{n.topo.node}", *pylium, "agent",
                              "--socket", sock, "--state-dir", str(tmp_path / "state"),
                              "--bpffs-root", str(n.root), "--node-name", "mon"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monitor = None
    try:
        for _ in range(100):
            if subprocess.run([*pylium, "-H", sock, "status"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("agent did not come up: " + (agent.stderr.read() if agent.poll() is not None else ""))
        n.dp.update_policy(1, EndpointPolicy(True, True, {PolicyKey(0, Direction.EGRESS): PolicyEntry()}, 1))
        n.dp.update_policy(2, EndpointPolicy(True, True, {}, 1))
        monitor = subprocess.Popen([*pylium, "-H", sock, "monitor", "--type", "drop", "-n", "1"],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        in_ns(n.pods["a"]["ns"], "ping", "-c2", "-W1", PODS["b"][0], check=False)
        out, _ = monitor.communicate(timeout=20)
        assert out.startswith("xx drop ("), out
        assert "ingress, identity 1300->1301: 10.213.0.10 -> 10.213.0.11" in out
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
