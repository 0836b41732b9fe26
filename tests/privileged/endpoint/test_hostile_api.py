"""Hostile requests to a real agent's endpoint and policy API: each is a 400 with one line
(never the `500 internal error` + traceback they once were), and nothing is left behind:
no address taken from the pool, no veth, no endpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pylium.agent.client import UnixHTTPConnection
from pylium.datapath import netns as plumbing

from .eplab import api


def _send(lab, method: str, path: str, body: bytes) -> tuple[int, str]:
    conn = UnixHTTPConnection(lab.client().socket_path, 30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw)["error"]


def test_endpoint_and_policy_requests_that_once_were_500s(fresh_lab, tmp_path):
    regular = tmp_path / "not-a-netns"
    regular.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        str(regular): "is not a network namespace (a regular file)",
        str(tmp_path): "is not a network namespace",
        str(fifo): "is not a network namespace",  # never opened: opening would block
        "/proc/self/ns/uts": "is a namespace but not a network namespace",
        "../../../etc/passwd": "is not a network namespace",
    }
    for netns, expected in cases.items():
        status, error = _send(fresh_lab, "PUT", "/v1/endpoint/hostile",
                              json.dumps({"labels": {"app": "x"}, "netns": netns}).encode())
        assert status == 400 and error.startswith(f"netns: {netns} {expected}"), error
    deep = b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for method, path in (("POST", "/v1/policy"), ("PUT", "/v1/endpoint/deep"),
                         ("POST", "/v1/policy/trace")):
        status, error = _send(fresh_lab, method, path, deep)
        assert status == 400 and error == "request body: nested deeper than 64 levels", \
            (path, status, error)
    status, error = _send(fresh_lab, "POST", "/v1/policy", b'{"text": "\xff"}')
    assert status == 400 and error.startswith("request body: not UTF-8 text"), error
    # nothing half made: no endpoint, no address, no veth; the agent serves on
    assert api(fresh_lab).get("/v1/endpoint") == []
    ipam = Path(fresh_lab.node()["state_dir"]) / "ipam.json"
    assert not ipam.exists() or json.loads(ipam.read_text())["allocated"] == {}
    assert not [link for link in plumbing.list_links(fresh_lab.node()["netns"])
                if link.ifname.startswith("lxc")]
    assert api(fresh_lab).get("/v1/policy")["policies"] == []
