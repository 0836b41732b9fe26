"""The Star Wars lab through the CLI, as a user runs it: `lab up --demo starwars`, both ships
land, rule1 imported, tiefighter lands and xwing is dropped (seen in `bpf metrics`), then
`lab down` leaves no netns, link, pin, process, socket or state behind."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

PYLIUM = str(Path(sys.executable).with_name("pylium"))


def _leftovers(name: str, status: dict) -> list[str]:
    left = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{name}-")]
    for node in status["nodes"]:
        for path in (node["socket"], f"/sys/fs/bpf/pylium/{name}-{node['name']}",
                     f"/var/lib/pylium/lab/{name}-{node['name']}"):
            if os.path.lexists(path):
                left.append(path)
    if os.path.exists(f"/var/run/pylium/lab/{name}.json"):
        left.append("lab state file")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    left += [f"process {line}" for line in ps.splitlines() if f"/{name}-node" in line]
    return left


def _lab_cli():
    """A fresh lab name, its environment and a `pylium` runner whose CLI talks to that lab's node1."""
    name = "s" + secrets.token_hex(3)
    env = {**os.environ, "PYLIUM_LAB": name, "PYLIUM_SOCKET": f"/var/run/pylium/{name}-node1.sock"}

    def pylium(*args, check=True, timeout=120):
        return subprocess.run([PYLIUM, *args], capture_output=True, text=True, env=env,
                              check=check, timeout=timeout)
    return name, env, pylium


def test_starwars_story_and_clean_teardown(example_policies):
    name, env, pylium = _lab_cli()

    status = None
    try:
        pylium("lab", "up", "--demo", "starwars")
        status = json.loads(pylium("lab", "status", "-o", "json").stdout)
        assert [n["name"] for n in status["nodes"]] == ["node1"]
        assert status["nodes"][0]["ip"]
        pods = {p["name"]: p for p in status["pods"]}
        assert set(pods) == {"deathstar", "deathstar-2", "tiefighter", "xwing"}
        assert pods["deathstar"]["labels"] == {"org": "empire", "class": "deathstar"}
        assert pods["deathstar-2"]["labels"] == pods["deathstar"]["labels"]
        # Cilium's demo: both deathstar replicas behind the `deathstar` ClusterIP
        assert [(s["name"], s["frontend"], s["backends"]) for s in status["services"]] == [
            ("default/deathstar", "10.96.0.10:80/TCP",
             [f"{pods['deathstar']['ip']}:80", f"{pods['deathstar-2']['ip']}:80"])]
        table = pylium("lab", "status").stdout
        assert "default/deathstar" in table and "10.96.0.10:80/TCP" in table, table
        assert pods["xwing"]["node"] == "node1"
        url = "http://10.96.0.10/v1/request-landing"  # through the service VIP

        def land(ship):
            return pylium("lab", "exec", ship, "--", "curl", "-s", "--max-time", "2",
                          "-XPOST", url, check=False)

        for ship in ("tiefighter", "xwing"):
            proc = land(ship)
            assert proc.returncode == 0 and proc.stdout == "Ship landed\n", proc
        # lab exec hands back the command's exit code
        assert pylium("lab", "exec", "xwing", "--", "sh", "-c", "exit 7",
                      check=False).returncode == 7

        pylium("policy", "import", str(example_policies / "l3-l4-rule1.yaml"))
        deadline = time.monotonic() + 10  # regeneration is asynchronous to the import
        while True:  # both replicas: the service may pick either
            deathstar, replica = (json.loads(pylium("endpoint", "get", ep, "-o", "json").stdout)
                                  for ep in ("deathstar", "deathstar-2"))
            if all(e["ingress_enforced"] and e["state"] == "ready" for e in (deathstar, replica)):
                break
            assert time.monotonic() < deadline, deathstar
            time.sleep(0.1)
        proc = land("tiefighter")
        assert proc.returncode == 0 and proc.stdout == "Ship landed\n"
        proc = land("xwing")
        assert proc.returncode == 28 and proc.stdout == ""  # timed out: SYN dropped
        # `policy trace --datapath`: the attached programs agree with the reference evaluator
        for ship, verdict in (("tiefighter", "allowed"), ("xwing", "denied")):
            labels = ",".join(f"{k}={v}" for k, v in pods[ship]["labels"].items())
            traced = json.loads(pylium("policy", "trace", "--src", labels, "--dst",
                                       "org=empire,class=deathstar", "--dport", "80",
                                       "--datapath", "-o", "json").stdout)
            assert traced["verdict"] == verdict, traced
            assert traced["datapath"]["verdict"] == verdict, traced
            assert traced["datapath"]["agrees"] is True, traced
            ingress = traced["datapath"]["ingress"]
            assert ingress["endpoint"] == deathstar["id"]
            assert ingress["action"] == ("dropped" if verdict == "denied" else "forwarded")
        # fail closed: with no L7 proxy running, the L7 variant of rule1 may not turn into an
        # L4 allow of port 80 — even the empire's POST is dropped, and the trace says why
        revisions = (deathstar["policy_revision"], replica["policy_revision"])
        pylium("policy", "import", str(example_policies / "l7-rule1.yaml"))
        deadline = time.monotonic() + 10
        while True:
            deathstar, replica = (json.loads(pylium("endpoint", "get", ep, "-o", "json").stdout)
                                  for ep in ("deathstar", "deathstar-2"))
            if all(e["policy_revision"] > rev and e["state"] == "ready"
                   for e, rev in zip((deathstar, replica), revisions, strict=True)):
                break
            assert time.monotonic() < deadline, deathstar
            time.sleep(0.1)
        proc = land("tiefighter")
        assert proc.returncode == 28 and proc.stdout == "", proc
        traced = json.loads(pylium("policy", "trace", "--src", "org=empire,class=tiefighter",
                                   "--dst", "org=empire,class=deathstar", "--dport", "80",
                                   "--http-method", "POST", "--http-path",
                                   "/v1/request-landing", "--datapath", "-o", "json").stdout)
        assert traced["verdict"] == "redirected"
        assert traced["datapath"]["verdict"] == "denied" and traced["datapath"]["agrees"], traced
        metrics = json.loads(pylium("bpf", "metrics", "list", "-o", "json").stdout)
        denied = [m for m in metrics if "denied" in m["reason_desc"].lower()]
        assert denied and denied[0]["packets"] >= 1
    finally:
        pylium("lab", "down", check=False)
    assert _leftovers(name, status or {"nodes": [{"name": "node1", "socket":
                                                  env["PYLIUM_SOCKET"]}]}) == []


def test_starwars_l7_demo_lab_and_its_proxy_goes_with_lab_down():
    """`lab up --demo starwars-l7`: the agent runs the HTTP proxy plugin and the L7 rule1 is
    imported, so tiefighter may POST /v1/request-landing, gets 403 `Access denied` for
    PUT /v1/exhaust-port, and xwing is dropped at L3/L4; `lab down` also stops the proxy
    process (it outlives agents on purpose, never a lab)."""
    name, env, pylium = _lab_cli()

    status = None
    try:
        pylium("lab", "up", "--demo", "starwars-l7")
        status = json.loads(pylium("lab", "status", "-o", "json").stdout)
        (service,) = status["services"]
        deathstar = service["frontend"].split(":")[0]  # the VIP: the proxy sees a replica

        def curl(ship: str, method: str, path: str) -> subprocess.CompletedProcess:
            # bytes: the proxy's body ends in CRLF, which text mode would fold
            return subprocess.run(
                [PYLIUM, "lab", "exec", ship, "--", "curl", "-s", "--max-time", "2", "-w",
                 " %{http_code}", "-X", method, f"http://{deathstar}{path}"],
                capture_output=True, env=env, timeout=60)

        deadline = time.monotonic() + 20
        landed = curl("tiefighter", "POST", "/v1/request-landing")
        while landed.stdout != b"Ship landed\n 200" and time.monotonic() < deadline:
            time.sleep(0.5)  # the proxy's policy push follows the import asynchronously
            landed = curl("tiefighter", "POST", "/v1/request-landing")
        assert landed.stdout == b"Ship landed\n 200", landed
        for _ in range(6):  # whichever replica the service picks, the proxy is in the path
            again = curl("tiefighter", "POST", "/v1/request-landing")
            assert again.stdout == b"Ship landed\n 200", again
        denied = curl("tiefighter", "PUT", "/v1/exhaust-port")
        assert denied.stdout == b"Access denied\r\n 403", denied
        assert curl("xwing", "POST", "/v1/request-landing").returncode == 28
        caps = json.loads(pylium("status", "-o", "json").stdout)["capabilities"]
        (http,) = [c for c in caps if c["kind"] == "l7" and c["name"] == "http"]
        assert http["state"] == "running"
        assert http["status"]["pid"] in proxy_pids(name)
    finally:
        pylium("lab", "down", check=False)
    if status is not None:
        assert _leftovers(name, status) == []
    assert proxy_pids(name) == []


def proxy_pids(lab: str) -> list[int]:
    """L7 proxy processes of `lab`'s nodes (by their command line)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pylium.l7.proxy" in cmdline and f"/{lab}-node1/".encode() in cmdline:
            pids.append(int(pid))
    return pids

