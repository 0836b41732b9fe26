"""`pylium observe --all-nodes` across two real agents in a two-node lab (agents share one
KV store file, as a cluster shares its store): node1's API answers with node2's flows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pylium.lab.lab import STATE_ROOT, Lab

PYLIUM = str(Path(sys.executable).with_name("pylium"))


def test_all_nodes_merges_flows_of_both_agents():
    name = f"pm{uuid.uuid4().hex[:4]}"
    kv = STATE_ROOT / f"{name}-shared-kv.sqlite3"
    lab = Lab(name)
    try:
        lab.up(nodes=2, agent_settings={"kvstore_options": {"path": str(kv)}})
        lab.add_pod("alpha", {"app": "alpha"}, node="node1")
        lab.add_pod("beta", {"app": "beta"}, node="node2")
        beta_ip = lab.pod("beta")["ip"]
        alpha_ip = lab.pod("alpha")["ip"]
        sock1 = lab.node("node1")["socket"]

        def nodes_seen() -> set[str]:
            # each pod sends to the other; each node's programs see their own pod's packets
            lab.exec("alpha", ["curl", "-s", "-m", "1", f"http://{beta_ip}:8080/"], timeout=20)
            lab.exec("beta", ["curl", "-s", "-m", "1", f"http://{alpha_ip}:8080/"], timeout=20)
            proc = subprocess.run([PYLIUM, "-H", sock1, "observe", "--all-nodes", "--protocol",
                                   "tcp", "--to-port", "8080", "-o", "json", "--since", "5m"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            lines = [json.loads(x) for x in proc.stdout.splitlines()]
            assert not [x for x in lines if "node_status" in x], lines
            return {x["node_name"] for x in lines if "flow" in x}

        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while time.monotonic() < deadline and seen != {"node1", "node2"}:
            seen = nodes_seen()
        assert seen == {"node1", "node2"}
        # without --all-nodes node1 answers for itself only
        proc = subprocess.run([PYLIUM, "-H", sock1, "observe", "--protocol", "tcp", "-o",
                               "json", "--since", "5m"], capture_output=True, text=True,
                              timeout=60)
        assert {json.loads(x)["node_name"] for x in proc.stdout.splitlines()} == {"node1"}
    finally:
        lab.down()
        for suffix in ("", "-wal", "-shm"):
            Path(str(kv) + suffix).unlink(missing_ok=True)
