"""Deselecting an L7 parser stops its proxy: the proxy process outlives agent restarts (so a
restart cuts no proxied connection), and an agent started without the parser stops it for
good instead of leaving it running with nobody to feed it policy. A one-node lab."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import yaml
from pylium.l7.proxy import running_pid
from pylium.lab.lab import Lab
from pylium.lab.processes import stop_process


def _restart(lab: Lab, node: str, edit) -> None:
    entry = lab.node(node)
    stop_process(entry["agent_pid"], entry["state_dir"])
    path = Path(entry["state_dir"]) / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    lab.start_agent(lab.node(node))


def test_deselected_http_parser_stops_its_proxy():
    lab = Lab(f"tl{uuid.uuid4().hex[:4]}")
    try:
        lab.up(nodes=1, agent_settings={"l7_parsers": ["http"]})
        state = Path(lab.node("node1")["state_dir"])
        proxy_dir = state / "plugins" / "l7-http" / "proxy"
        pid = running_pid(proxy_dir)
        assert pid is not None

        _restart(lab, "node1", lambda config: None)  # still selected: adopted, not stopped
        assert running_pid(proxy_dir) == pid

        _restart(lab, "node1", lambda config: config.update(l7_parsers=[]))
        deadline = time.monotonic() + 10
        while running_pid(proxy_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running_pid(proxy_dir) is None
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] == "Z"
        assert "l7" not in json.loads((state / "capabilities.json").read_text())
    finally:
        lab.down()
