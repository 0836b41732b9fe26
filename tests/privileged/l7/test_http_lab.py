"""The Star Wars L7 demo end to end with the real pieces: a lab node whose agent selects the
`http` L7 parser (this plugin's proxy process, spawned by the agent), the datapath's
redirect to it, rule1's L7 variant imported over the API, curl from the pods."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pylium.l7.proxy import running_pid, stop_running

from ..endpoint.eplab import api, import_policy, make_lab
from .redirect_lab import INGRESS_PROXY, pods, redirect_entries
from .test_redirect_traffic import observe

SHIPS = {"tiefighter": {"org": "empire", "class": "tiefighter"},
         "xwing": {"org": "alliance", "class": "xwing"},
         "deathstar": {"org": "empire", "class": "deathstar"}}


@pytest.fixture(scope="module")
def lab():
    lab = None
    proxy_dir = None
    try:
        lab = make_lab(l7_parsers=["http"],
                       plugin_options={"http": {"stop_proxy_on_exit": True}})
        proxy_dir = Path(lab.node("node1")["state_dir"]) / "plugins" / "l7-http" / "proxy"
        for name, labels in SHIPS.items():
            lab.add_pod(name, labels, server="deathstar" if name == "deathstar" else None)
        yield lab
    finally:
        if lab is not None:
            lab.down()
        if proxy_dir is not None:  # the agent stops it (stop_proxy_on_exit); never leak one
            assert running_pid(proxy_dir) is None
            stop_running(proxy_dir)


def curl(lab, ship: str, method: str, url: str) -> tuple[int, str]:
    got = lab.exec(ship, ["curl", "-s", "-m", "3", "-X", method, "-w", "|%{http_code}", url],
                   timeout=20)
    body, _, code = got.stdout.rpartition("|")
    return (int(code) if code.isdigit() else 0), body


def test_tiefighter_lands_exhaust_port_is_403_xwing_is_dropped(lab, example_policies):
    p = pods(lab)
    deathstar = p["deathstar"]
    status = [c for c in api(lab).get("/v1/status")["capabilities"] if c["kind"] == "l7"
              and c["name"] == "http"][0]
    assert status["state"] == "running" and status["status"]["healthy"], status
    import_policy(lab, (example_policies / "l7-rule1.yaml").read_text())
    assert {e["proxy_port"] for e in redirect_entries(lab, deathstar["endpoint_id"])} \
        == {INGRESS_PROXY}
    base = f"http://{deathstar['ip']}"
    assert curl(lab, "tiefighter", "POST", f"{base}/v1/request-landing") == (200, "Ship landed\n")
    code, body = curl(lab, "tiefighter", "PUT", f"{base}/v1/exhaust-port")
    assert (code, body.strip()) == (403, "Access denied")  # (bytes exact: test_http_proxy)
    assert curl(lab, "xwing", "POST", f"{base}/v1/request-landing")[0] == 0  # L3/L4 drop
    # every request and response is an L7 flow with the real client and server
    deadline = time.monotonic() + 5
    while True:
        flows = [f for f in observe(lab, "--from-pod", "default/tiefighter")
                 if f.get("l7")] + [f for f in observe(lab, "--to-pod", "default/tiefighter")
                                    if f.get("l7")]
        kinds = {(f["l7"]["type"], f["verdict"]) for f in flows}
        if {("REQUEST", "FORWARDED"), ("REQUEST", "DROPPED"),
                ("RESPONSE", "FORWARDED")} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {("REQUEST", "FORWARDED"), ("REQUEST", "DROPPED"), ("RESPONSE", "FORWARDED")} \
        <= kinds, flows
    denied = [f for f in flows if f["l7"]["type"] == "REQUEST" and f["verdict"] == "DROPPED"]
    assert denied[0]["l7"]["http"]["method"] == "PUT"


def test_kill_9_of_the_agent_during_wrk_fails_no_request_and_the_new_agent_adopts(
        lab, example_policies):
    deathstar = pods(lab)["deathstar"]
    import_policy(lab, (example_policies / "l7-rule1.yaml").read_text())
    proxy_dir = Path(lab.node("node1")["state_dir"]) / "plugins" / "l7-http" / "proxy"
    proxy = running_pid(proxy_dir)
    assert proxy is not None
    script = lab.node("node1")["state_dir"] + "/l7-wrk-post.lua"
    Path(script).write_text('wrk.method = "POST"\n')
    wrk = subprocess.Popen(lab.exec_argv("tiefighter", [
        "wrk", "-t1", "-c8", "-d5s", "-s", script,
        f"http://{deathstar['ip']}/v1/request-landing"]), stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    agent = lab.node()["agent_pid"]
    os.kill(agent, signal.SIGKILL)
    out, _ = wrk.communicate(timeout=40)
    print(out)
    assert int(re.search(r"(\d+) requests in", out).group(1)) > 100, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    lab.start_agent(lab.node())
    status = [c for c in api(lab).get("/v1/status")["capabilities"] if c["kind"] == "l7"
              and c["name"] == "http"][0]["status"]
    assert (status["how"], status["pid"]) == ("adopted", proxy)
    assert curl(lab, "tiefighter", "POST", f"http://{deathstar['ip']}/v1/request-landing") \
        == (200, "Ship landed\n")
