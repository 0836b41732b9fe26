"""The datapath's redirect to the node's L7 proxy, on real traffic: a real agent in a lab node
netns, pods wired through its API, policies with HTTP rules imported over the API, curl from
a pod. The proxy is a tiny transparent listener (redirect_listener.py) in the node netns; a
test L7 plugin (redirect_plugin.py) tells the agent honestly whether it listens. Asserted:
the listener receives the connection with the original destination as getsockname(), its
upstream (SO_MARK = client identity) is judged by the destination's policy as the client,
and without a listening proxy nothing gets through (fail closed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pylium.datapath import netns as plumbing
from pylium.datapath.marks import (
    MARK_MAGIC_MASK,
    MARK_MAGIC_TO_PROXY,
    PROXY_ROUTE_TABLE,
    PROXY_RULE_PRIORITY,
)

from ..endpoint.eplab import api, delete_policies, import_policy, make_lab
from .redirect_lab import (
    EGRESS_PROXY,
    INGRESS_PROXY,
    Listener,
    land,
    metric,
    plugin_site,
    pods,
    redirect_entries,
)

INGRESS_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rd-ingress-l7}
spec:
  endpointSelector: {matchLabels: {app: rdserver}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: rdclient}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""

EGRESS_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rd-egress-l7}
spec:
  endpointSelector: {matchLabels: {app: rdclient}}
  egress:
  - toEndpoints: [{matchLabels: {app: rdserver}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""

WORLD_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rd-world-l7}
spec:
  endpointSelector: {matchLabels: {app: rdserver}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""

SERVER_ALLOWS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rd-server-l4}
spec:
  endpointSelector: {matchLabels: {app: rdserver}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: %s}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"""


def observe(lab, *args: str) -> list[dict]:
    proc = subprocess.run([str(Path(sys.executable).with_name("pylium")), "-H",
                           lab.node("node1")["socket"], "observe", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["flow"] for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lab():
    with plugin_site() as site:
        lab = None
        try:
            lab = make_lab(l7_parsers=["redirecttest"])
            for name in ("rdclient", "rdserver", "rdother"):
                lab.add_pod(name, {"app": name},
                            server="deathstar" if name == "rdserver" else None)
            lab.logs = site
            yield lab
        finally:
            if lab is not None:
                lab.down()


@pytest.fixture
def fresh(lab):
    delete_policies(lab)
    listeners: list[Listener] = []

    def listen(port: int, identities: dict[str, int], egress_magic: bool = False) -> Listener:
        made = Listener(lab, port, identities, lab.logs / f"listener-{port}-{len(listeners)}.log",
                        egress_magic)
        listeners.append(made)
        return made

    yield listen
    for made in listeners:
        made.stop()
    delete_policies(lab)


def test_ingress_rule_sends_the_connection_to_the_proxy_with_its_original_destination(lab, fresh):
    p = pods(lab)
    client, server = p["rdclient"], p["rdserver"]
    proxy = fresh(INGRESS_PROXY, {client["ip"]: client["identity"]})
    import_policy(lab, INGRESS_L7)
    assert [e["proxy_port"] for e in redirect_entries(lab, server["endpoint_id"])] == [INGRESS_PROXY]

    got = land(lab, "rdclient", server["ip"])
    assert got.returncode == 0 and got.stdout == "Ship landed\n", got
    [conn] = proxy.connections()
    assert conn["sockname"] == [server["ip"], 80]       # the original destination
    assert conn["peername"][0] == client["ip"]          # the client, not the node
    assert conn["upstream"] == "connected"
    ct = api(lab).get("/v1/bpf/ct")
    redirected = [c for c in ct if c["src"] == client["ip"]
                  and c["sport"] == conn["peername"][1] and c["direction"] == "ingress"]
    assert redirected and all(c["proxy_port"] == INGRESS_PROXY for c in redirected)
    # the proxy's own upstream (from the node) was judged as the client by the server
    upstream = [c for c in ct if c["dst"] == server["ip"] and c["dport"] == 80
                and c["src"] == lab.node("node1")["ip"] and c["direction"] == "ingress"]
    assert upstream and {c["src_identity"] for c in upstream} == {client["identity"]}
    assert all(c["proxy_port"] == 0 for c in upstream)  # not sent to the proxy again

    # Hubble's view: the policy verdict REDIRECTED and a trace to the proxy, with its port
    seen = observe(lab, "--from-pod", "default/rdclient", "--to-port", "80")
    assert any(f["verdict"] == "REDIRECTED" and f.get("proxy_port") == INGRESS_PROXY
               for f in seen), seen
    assert any(f.get("trace_observation_point") == "TO_PROXY"
               and f["traffic_direction"] == "INGRESS" for f in seen), seen

    # a pod the policy does not name is dropped at L3/L4: it never reaches the proxy
    assert land(lab, "rdother", server["ip"]).returncode != 0
    assert len(proxy.connections()) == 1


#: a client that reads until the server closes (so the proxy's side closes first and
#: lingers in TIME_WAIT) from a fixed source port
FIXED_PORT_CLIENT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 40321))
s.settimeout(3)
s.connect((sys.argv[1], 80))
s.sendall(b"POST /v1/request-landing HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().split("\\r\\n\\r\\n", 1)[1], end="")
"""


def test_a_reused_client_port_reaches_the_proxy_again(lab, fresh):
    """The proxy closes first, so its socket of the last connection lingers in TIME_WAIT
    under the same tuple: a new connection from the same client port must still reach
    the proxy's listener (the kernel refuses a new socket beside the TIME_WAIT one, so
    the datapath lets TIME_WAIT handling end it first)."""
    p = pods(lab)
    client, server = p["rdclient"], p["rdserver"]
    proxy = fresh(INGRESS_PROXY, {client["ip"]: client["identity"]})
    import_policy(lab, INGRESS_L7)
    for attempt in range(2):
        got = lab.exec("rdclient", [sys.executable, "-c", FIXED_PORT_CLIENT, server["ip"]],
                       timeout=20)
        assert got.returncode == 0 and got.stdout == "Ship landed\n", (attempt, got)
        if attempt == 0:
            waiting = subprocess.run(["nsenter", f"--net=/run/netns/{lab.node('node1')['netns']}",
                                      "ss", "-Htan", "state", "time-wait", "sport", "= :80"],
                                     capture_output=True, text=True).stdout
            assert f"{client['ip']}:40321" in waiting  # the proxy's side of the last one
    assert [c["peername"] for c in proxy.connections(wait_for=2)] == [[client["ip"], 40321]] * 2


def test_ingress_rule_redirects_a_client_outside_the_node(lab, fresh):
    """From the world the packet comes through the node's stack (not from a pod's
    program): the server's to_container still hands it to the proxy."""
    server = pods(lab)["rdserver"]
    world_ip = lab.status()["world"]["ip"]
    proxy = fresh(INGRESS_PROXY, {world_ip: 2})
    import_policy(lab, WORLD_L7)
    got = land(lab, "world", server["ip"])
    assert got.returncode == 0 and got.stdout == "Ship landed\n", got
    [conn] = proxy.connections()
    assert conn["sockname"] == [server["ip"], 80] and conn["peername"][0] == world_ip
    assert conn["identity"] == 2 and conn["upstream"] == "connected"


def test_proxy_cannot_launder_a_denied_identity(lab, fresh):
    """The upstream's identity comes from its mark: a proxy speaking for an identity the
    server does not allow gets dropped by the server's policy."""
    p = pods(lab)
    client, server, other = p["rdclient"], p["rdserver"], p["rdother"]
    proxy = fresh(INGRESS_PROXY, {client["ip"]: other["identity"]})
    import_policy(lab, INGRESS_L7)
    before = metric(lab, 133)
    assert land(lab, "rdclient", server["ip"]).returncode != 0
    [conn] = proxy.connections(wait_for=1)
    assert conn["sockname"] == [server["ip"], 80]
    assert conn["upstream"].startswith("error"), conn
    assert metric(lab, 133) > before  # "Policy denied" at the server's ingress


def test_egress_rule_sends_the_connection_to_the_egress_proxy(lab, fresh):
    p = pods(lab)
    client, server = p["rdclient"], p["rdserver"]
    proxy = fresh(EGRESS_PROXY, {client["ip"]: client["identity"]})
    import_policy(lab, EGRESS_L7)
    import_policy(lab, SERVER_ALLOWS % "rdclient")
    assert [e["proxy_port"] for e in redirect_entries(lab, client["endpoint_id"])] == [EGRESS_PROXY]

    got = land(lab, "rdclient", server["ip"])
    assert got.returncode == 0 and got.stdout == "Ship landed\n", got
    [conn] = proxy.connections()
    assert conn["sockname"] == [server["ip"], 80] and conn["peername"][0] == client["ip"]
    redirected = [c for c in api(lab).get("/v1/bpf/ct") if c["src"] == client["ip"]
                  and c["sport"] == conn["peername"][1] and c["direction"] == "egress"]
    assert redirected and all(c["proxy_port"] == EGRESS_PROXY for c in redirected)

    # the server now allows nobody it knows: the proxied upstream (as the client) is dropped
    api(lab).delete("/v1/policy?name=rd-server-l4")
    import_policy(lab, SERVER_ALLOWS % "nobody")
    assert land(lab, "rdclient", server["ip"]).returncode != 0
    _first, second = proxy.connections(wait_for=2)
    assert second["sockname"] == [server["ip"], 80] and second["upstream"].startswith("error")


def test_egress_proxy_magic_sends_its_upstream_through_the_ingress_proxy(lab, fresh):
    """Egress and ingress L7 rules on one connection: an egress proxy that marks its
    upstream MARK_MAGIC_PROXY_EGRESS gets the server's own ingress redirect applied (with
    the plain identity mark the server would take the upstream as already proxied)."""
    p = pods(lab)
    client, server = p["rdclient"], p["rdserver"]
    node_ip = lab.node("node1")["ip"]
    egress = fresh(EGRESS_PROXY, {client["ip"]: client["identity"]}, egress_magic=True)
    ingress = fresh(INGRESS_PROXY, {node_ip: client["identity"]})
    import_policy(lab, EGRESS_L7)
    import_policy(lab, INGRESS_L7)
    got = land(lab, "rdclient", server["ip"])
    assert got.returncode == 0 and got.stdout == "Ship landed\n", got
    [first] = egress.connections(wait_for=1)
    [second] = ingress.connections(wait_for=1)
    assert first["sockname"] == second["sockname"] == [server["ip"], 80]
    assert first["peername"][0] == client["ip"] and second["peername"][0] == node_ip
    assert first["upstream"] == second["upstream"] == "connected"


def test_without_a_listening_proxy_redirects_load_as_deny(lab, fresh):
    p = pods(lab)
    server = p["rdserver"]
    import_policy(lab, INGRESS_L7)  # nothing listens on the proxy port
    assert redirect_entries(lab, server["endpoint_id"]) == []
    assert land(lab, "rdclient", server["ip"]).returncode != 0


def test_proxy_that_dies_leaves_redirected_flows_dropped(lab, fresh):
    """The policy still says redirect (nobody re-computed it yet) but no socket listens:
    the datapath drops ("Socket lookup failed") instead of forwarding."""
    p = pods(lab)
    client, server = p["rdclient"], p["rdserver"]
    proxy = fresh(INGRESS_PROXY, {client["ip"]: client["identity"]})
    import_policy(lab, INGRESS_L7)
    assert land(lab, "rdclient", server["ip"]).stdout == "Ship landed\n"
    proxy.stop()
    assert redirect_entries(lab, server["endpoint_id"])  # still loaded as redirect
    before = metric(lab, 178)
    assert land(lab, "rdclient", server["ip"]).returncode != 0
    assert metric(lab, 178) > before


def test_trace_reports_the_redirect_and_its_proxy_port(lab, fresh):
    p = pods(lab)
    client = p["rdclient"]
    fresh(INGRESS_PROXY, {client["ip"]: client["identity"]})
    import_policy(lab, INGRESS_L7)
    out = api(lab).post("/v1/policy/trace", {"src": "app=rdclient", "dst": "app=rdserver",
                                             "dport": 80, "datapath": True})
    dp = out["datapath"]
    assert (dp["verdict"], dp["agrees"], dp["proxy_port"]) == ("redirected", True, INGRESS_PROXY), dp
    assert (dp["ingress"]["action"], dp["ingress"]["proxy_port"]) == ("to-proxy", INGRESS_PROXY)
    assert dp["notes"] == []
    text = subprocess.run([str(Path(sys.executable).with_name("pylium")), "-H",
                           lab.node("node1")["socket"], "policy", "trace", "--src",
                           "app=rdclient", "--dst", "app=rdserver", "--dport", "80",
                           "--datapath"], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "Datapath: redirected (agrees" in text.stdout
    assert f"ingress program of endpoint {p['rdserver']['endpoint_id']}: to the L7 proxy on " \
           f"port {INGRESS_PROXY}" in text.stdout, text.stdout


def test_lab_down_leaves_no_rules_netns_or_pins(lab):
    node = lab.node("node1")
    state = plumbing.fwmark_local_table_present(MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK,
                                                PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY,
                                                netns=node["netns"])
    assert state == {"rule": True, "route": True}
    netns = [n["netns"] for n in lab.status()["nodes"]] + [q["netns"] for q in lab.status()["pods"]]
    lab.down()
    assert not any(plumbing.netns_exists(n) for n in netns)
    assert not Path(node["bpffs_root"]).exists()
    root = plumbing.fwmark_local_table_present(MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK,
                                               PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY)
    assert root == {"rule": False, "route": False}  # never installed in this (root) netns
