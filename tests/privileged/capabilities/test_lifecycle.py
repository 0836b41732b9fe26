"""The capability lifecycle from outside: a third-party plugin (installed like a pip-installed
distribution, outside `plugins/`) provides one capability of every kind; selecting them all,
a real agent builds each backend with its context, loads each record's BPF through the core,
starts them in order (visible as `running` in `pylium status` / `pylium plugins`), calls every
event hook, and on SIGTERM stops them in reverse order and releases their programs.
(A selected placeholder stopping start-up with exit 3 is checked in
tests/unit/foundation/test_cli_agent.py: no shipped plugin is a placeholder any more.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from pylium.datapath import Datapath

from tests.unit.foundation._helpers import FakeSite, run_pylium

HERE = Path(__file__).parent
PYLIUM = str(Path(sys.executable).with_name("pylium"))
KINDS = ("kvstore", "routing", "encryption", "l7", "orchestrator")
NODE_IP = "10.213.0.1"
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-l7}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/"}]
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def recording_programs() -> int:
    """How many programs named recording_prog the kernel holds right now."""
    out = sh("bpftool", "-j", "prog", "show").stdout
    return sum(1 for p in json.loads(out or "[]") if p.get("name") == "recording_prog")


@pytest.fixture
def world(tmp_path):
    """A node netns (the agent's) holding NODE_IP, a pod netns, the plugin installed in a
    site dir, unique pins; all removed afterwards."""
    sh("sh", "-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf")
    tag = uuid.uuid4().hex[:6]
    node, pod = f"pyl-lc-node-{tag}", f"pyl-lc-pod-{tag}"
    for ns in (node, pod):
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", node, "link", "set", "lo", "up")
    sh("ip", "-n", node, "link", "add", "under0", "type", "veth", "peer", "name", "under1")
    sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "under0")
    sh("ip", "-n", node, "link", "set", "under0", "up")
    site = FakeSite(tmp_path / "site")
    site.root.mkdir()
    shutil.copy(HERE / "recording.bpf.c", site.root / "recording.bpf.c")
    site.add("pylium-recording", (HERE / "recording_plugin.py").read_text(),
             entry="recording", module="pylium_recording_plugin", version="2.3")
    bpffs = Path(f"/sys/fs/bpf/pylium-test-lifecycle-{tag}")
    yield {"node": node, "pod": pod, "site": site.root, "bpffs": bpffs, "tmp": tmp_path}
    for ns in (pod, node):
        sh("ip", "netns", "del", ns, check=False)
    Datapath(bpffs).destroy()
    assert not bpffs.exists()


def start_agent(world, config: dict) -> tuple[subprocess.Popen, Path, Path]:
    tmp = world["tmp"]
    sock, log_path, recording = tmp / "a.sock", tmp / "agent.log", tmp / "recording.jsonl"
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "node_name": "lc-node", "socket": str(sock), "state_dir": str(tmp / "state"),
        "bpffs_root": str(world["bpffs"]), "node_ip": NODE_IP, "pod_cidr": "10.213.1.0/24",
        **config}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLIUM_")}
    env.update(PYTHONPATH=str(world["site"]), RECORDING_LOG=str(recording))
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{world['node']}", "--", PYLIUM, "agent", "--config",
         str(config_path)], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)
    return proc, sock, recording


def cli(sock: Path, *args: str) -> dict | list:
    proc = run_pylium("--socket", str(sock), *args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_status(proc, sock: Path, log_path: Path) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        res = run_pylium("--socket", str(sock), "status", "-o", "json")
        if res.returncode == 0:
            return json.loads(res.stdout)
        time.sleep(0.2)
    raise AssertionError(log_path.read_text())


def events(recording: Path) -> list[dict]:
    return [json.loads(line) for line in recording.read_text().splitlines()]


def wait_event(recording: Path, predicate, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if recording.exists():
            for event in events(recording):
                if predicate(event):
                    return event
        time.sleep(0.1)
    raise AssertionError(f"no such event in {recording.read_text()}")


def test_every_kind_is_built_started_hooked_and_stopped_by_the_core(world):
    assert recording_programs() == 0
    proc, sock, recording = start_agent(world, {
        "kvstore": "recording-kv", "routing_mode": "recording-routing",
        "encryption": "recording-encryption", "l7_parsers": ["recording-l7"],
        "orchestrator": "recording-orchestrator",
        "plugin_options": {"recording-routing": {"colour": "blue"}}})
    log_path = world["tmp"] / "agent.log"
    try:
        status = wait_status(proc, sock, log_path)
        caps = {c["kind"]: c for c in status["capabilities"] if c["selected"]}
        assert set(caps) == set(KINDS)
        for kind in KINDS:
            assert caps[kind]["state"] == "running", caps[kind]
            assert caps[kind]["dist"] == "pylium-recording" and caps[kind]["version"] == "2.3"
        for kind in ("routing", "encryption", "l7", "orchestrator"):
            assert caps[kind]["bpf"] == {"sources": ["recording.bpf.c"],
                                         "programs": ["recording_prog"]}
        assert recording_programs() == 4  # one object per record, loaded by the core

        started = [e for e in events(recording) if e["event"] == "start"]
        assert [e["kind"] for e in started] == list(KINDS)
        by_kind = {e["kind"]: e for e in started}
        assert by_kind["routing"]["fd"] > 0 and by_kind["routing"]["datapath"] is True
        assert by_kind["routing"]["underlay"] == "under0"
        assert by_kind["routing"]["options"] == {"colour": "blue"}
        assert by_kind["encryption"]["routing_mode"] == "recording-routing"
        assert by_kind["l7"]["proxy_ports"] == {}  # "recording" is no protocol PROXY_PORTS knows
        assert by_kind["orchestrator"]["has_endpoints"] and by_kind["orchestrator"]["has_policy"]
        assert by_kind["kvstore"]["state_dir"].endswith("state/kvstore")

        plugins = cli(sock, "plugins")
        (row,) = [r for r in plugins if r["dist"] == "pylium-recording"]
        assert {(c["kind"], c["dist"], c["version"], c["selected"], c["state"])
                for c in row["capabilities"]} == \
            {(k, "pylium-recording", "2.3", True, "running") for k in KINDS}
        http = [c for r in plugins for c in r["capabilities"] if c["name"] == "http"]
        assert http and http[0]["state"] == "not selected"

        # event hooks: endpoint created, policy changed, the L7 parser found for a redirect
        ep = run_api(sock, "PUT", "/v1/endpoint/web",
                     {"namespace": "default", "labels": {"app": "web"}, "netns": world["pod"]})
        wait_event(recording, lambda e: e["event"] == "hook_endpoint_created"
                   and e["name"] == "web" and e["ipv4"] == ep["ipv4"])
        policy_file = world["tmp"] / "web-l7.yaml"
        policy_file.write_text(POLICY)
        res = run_pylium("--socket", str(sock), "policy", "import", str(policy_file))
        assert res.returncode == 0, res.stderr
        changed = wait_event(recording, lambda e: e["event"] == "hook_policy_changed"
                             and e["added"])
        assert changed["revision"] >= 1 and changed["deleted"] == []
        assert all("web-l7" in name for name in changed["added"])
        wait_event(recording, lambda e: e["event"] == "hook_l7_parser_for_port"
                   and e["port"] == 80 and e["protocol"] == "TCP")
        wait_event(recording, lambda e: e["event"] == "l7_snapshot" and e["entries"] == [
            {"ipv4": ep["ipv4"], "port": 80, "kinds": ["http"]}])

        # the redirect loads as deny while no proxy serves port 10080; once the parser says
        # it serves it, the L7 component regenerates and the entry redirects; and back
        def verdict_80() -> set[str]:
            dump = run_api(sock, "GET", f"/v1/bpf/policy/{ep['id']}")
            return {e["verdict"] for e in dump["entries"] if e["port"] == 80}

        def wait_verdict(expected: str) -> None:
            deadline = time.monotonic() + 10
            while verdict_80() != {expected} and time.monotonic() < deadline:
                time.sleep(0.2)
            assert verdict_80() == {expected}

        wait_verdict("deny")
        claim = world["tmp"] / "state" / "plugins" / "l7-recording-l7" / "serve"
        claim.write_text("10080")
        wait_verdict("redirect")
        claim.unlink()
        wait_verdict("deny")

        # node joined / left reach routing, encryption, then the hook, in that order
        run_api(sock, "PUT", "/v1/routing/nodes/n2",
                {"ipv4": "10.213.0.2", "pod_cidr": "10.213.2.0/24"})
        run_api(sock, "DELETE", "/v1/routing/nodes/n2")
        node_events = [e["event"] for e in events(recording) if e.get("node") == "n2"]
        assert node_events == ["routing_node_joined", "encryption_node_joined",
                               "hook_node_joined", "encryption_node_left",
                               "routing_node_left", "hook_node_left"]

        run_api(sock, "DELETE", "/v1/endpoint/web")
        wait_event(recording, lambda e: e["event"] == "hook_endpoint_deleted")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    stopped = [e["kind"] for e in events(recording) if e["event"] == "stop"]
    assert stopped == list(reversed(KINDS))
    assert not [e for e in events(recording) if e["event"] == "teardown"]  # stop is not teardown
    assert recording_programs() == 0  # the core closed what it loaded for the plugin
    leftovers = sorted(p.name for p in world["bpffs"].iterdir())
    assert "recording_hits" not in leftovers  # the plugin's own map was never pinned


def run_api(sock: Path, method: str, path: str, body: dict | None = None) -> dict:
    args = ["curl", "-s", "-w", "\\n%{http_code}", "-X", method, "--unix-socket", str(sock),
            f"http://agent{path}"]
    if body is not None:
        args += ["-H", "content-type: application/json", "-d", json.dumps(body)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60)
    body_text, _, code = res.stdout.rpartition("\n")
    assert res.returncode == 0 and code.startswith("2"), (method, path, res.stdout, res.stderr)
    return json.loads(body_text) if body_text.strip() else {}


def test_deselected_encryption_is_torn_down_at_the_next_start(world):
    """An encryption that ran leaves state on the node after the agent stops (that is the
    point: traffic keeps flowing). Started again without it, the agent builds that backend
    once more and calls its `teardown()`, once; a plugin no longer installed is named in a
    warning and does not stop the start."""
    selection = {"kvstore": "recording-kv", "routing_mode": "recording-routing",
                 "orchestrator": "recording-orchestrator"}
    log_path = world["tmp"] / "agent.log"
    ran_file = world["tmp"] / "state" / "capabilities.json"

    def run(config: dict) -> dict:
        proc, sock, _recording = start_agent(world, config)
        try:
            return wait_status(proc, sock, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()

    recording = world["tmp"] / "recording.jsonl"

    def teardowns() -> list[dict]:
        return [e for e in events(recording) if e["event"] == "teardown"]

    run({**selection, "encryption": "recording-encryption"})
    # the routing mode leaves state too (devices, programs, routes): recorded as well
    assert json.loads(ran_file.read_text()) == {"encryption": ["recording-encryption"],
                                                "routing": ["recording-routing"]}
    assert teardowns() == []  # an agent stop leaves it in place

    status = run(selection)
    assert teardowns() == [{"event": "teardown", "kind": "encryption"}]
    assert json.loads(ran_file.read_text()) == {"routing": ["recording-routing"]}
    (enc,) = [c for c in status["capabilities"] if c["name"] == "recording-encryption"]
    assert enc["state"] == "not selected"

    run(selection)
    assert len(teardowns()) == 1  # forgotten once cleaned up

    # a node upgraded from a version that kept no record: the state directory tells
    run({**selection, "encryption": "recording-encryption"})
    ran_file.unlink()
    run(selection)
    assert len(teardowns()) == 2
    assert json.loads(ran_file.read_text()) == {"routing": ["recording-routing"]}

    ran_file.write_text(json.dumps({"encryption": ["gone-encryption"]}))
    run(selection)
    assert "'gone-encryption' ran on this node before" in log_path.read_text()
    assert json.loads(ran_file.read_text()) == {"encryption": ["gone-encryption"], "routing": ["recording-routing"]}

    # another routing mode: the one that ran is built once more and torn down, once
    run({**selection, "routing_mode": "local"})
    assert teardowns()[2:] == [{"event": "teardown", "kind": "routing"}]
    assert json.loads(ran_file.read_text()) == {"encryption": ["gone-encryption"],
                                                "routing": ["local"]}
    run({**selection, "routing_mode": "local"})
    assert len(teardowns()) == 3
