"""Policy enforced on real traffic between pods (and the world namespace), through the
agent API: policies imported over the API, pods wired by the agent, packets judged by the
BPF programs on the pods' veths. (The datapath's own tests cover the same verdicts with
BPF_PROG_TEST_RUN; these prove the whole chain on live sockets.)"""

from __future__ import annotations

import socket
import time

import pytest
from pylium.datapath import netns as plumbing

from .eplab import (
    delete_policies,
    import_policy,
    make_lab,
    ping,
    serve_ports,
    tcp,
    wait_regenerated,
)

CT_TIMEOUT_NON_TCP = 2


@pytest.fixture(scope="module")
def lab():
    lab = make_lab(ct_timeout_non_tcp=CT_TIMEOUT_NON_TCP)
    try:
        for name in ("client", "server", "other"):
            lab.add_pod(name, {"app": name})
        serve_ports(lab, "server", 80, 8080, 8081, 9000)
        serve_ports(lab, "client", 7000)
        serve_ports(lab, "world", 80)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def pol(lab):
    """Import policies for one test; all are deleted afterwards."""
    try:
        yield lambda text: import_policy(lab, text)
    finally:
        delete_policies(lab)


def ip(lab, pod: str) -> str:
    return lab.pod(pod)["ip"]


def cnp(name: str, spec: str) -> str:
    return ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata:\n  name: {name}\nspec:\n{spec}")


def test_without_policy_everything_flows(lab):
    assert ping(lab, "client", ip(lab, "server")) and ping(lab, "server", ip(lab, "other"))
    assert ping(lab, "client", "198.51.100.20")
    assert tcp(lab, "client", ip(lab, "server"), 80)
    assert tcp(lab, "other", ip(lab, "server"), 9000)
    assert tcp(lab, "server", ip(lab, "client"), 7000)


def test_allow_admits_only_the_selected_peer_and_port(lab, pol):
    pol(cnp("allow-client", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""))
    assert tcp(lab, "client", ip(lab, "server"), 80)
    assert not tcp(lab, "client", ip(lab, "server"), 8080)
    assert not tcp(lab, "other", ip(lab, "server"), 80)


def test_deleting_the_policy_lifts_enforcement(lab, pol):
    pol(cnp("allow-client", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""))
    assert not tcp(lab, "other", ip(lab, "server"), 80)
    delete_policies(lab)
    assert tcp(lab, "other", ip(lab, "server"), 80)


def test_a_pod_created_after_the_policy_is_admitted(lab, pol):
    """A new identity changes what `fromEndpoints` selects: the server's policy map is
    regenerated when the pod appears."""
    pol(cnp("allow-late", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: late}}]
"""))
    server_policy = f"/v1/bpf/policy/{lab.pod('server')['endpoint_id']}"
    try:
        lab.add_pod("late", {"app": "late", "role": "late"})
        wait_regenerated(lab)
        late_identity = lab.client().get("/v1/endpoint/late")["identity"]
        assert tcp(lab, "late", ip(lab, "server"), 80)
        assert not tcp(lab, "client", ip(lab, "server"), 80)
        assert late_identity in {e["identity"] for e in lab.client().get(server_policy)["entries"]}
    finally:
        lab.remove_pod("late")
    wait_regenerated(lab)  # (the identity itself lives on until identity GC, as in Cilium)
    assert not tcp(lab, "client", ip(lab, "server"), 80)


def test_deny_beats_allow(lab, pol):
    pol(cnp("allow-all-but-8080", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""))
    assert tcp(lab, "client", ip(lab, "server"), 80)
    assert tcp(lab, "client", ip(lab, "server"), 9000)
    assert not tcp(lab, "client", ip(lab, "server"), 8080)


def test_port_range_with_end_port(lab, pol):
    pol(cnp("range", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", endPort: 8081, protocol: TCP}]}]
"""))
    assert tcp(lab, "client", ip(lab, "server"), 8080)
    assert tcp(lab, "client", ip(lab, "server"), 8081)
    assert not tcp(lab, "client", ip(lab, "server"), 9000)
    assert not tcp(lab, "client", ip(lab, "server"), 80)


def test_cidr_rule_with_except(lab, pol):
    pol(cnp("cidr", """
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.20/32]}]
"""))
    assert ping(lab, "client", "198.51.100.10")
    assert tcp(lab, "client", "198.51.100.10", 80)
    assert not ping(lab, "client", "198.51.100.20")
    assert not tcp(lab, "client", ip(lab, "server"), 80)  # egress is now default-deny


def test_entity_world(lab, pol):
    pol(cnp("from-world", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEntities: [world]
"""))
    assert tcp(lab, "world", ip(lab, "server"), 80)
    assert not tcp(lab, "client", ip(lab, "server"), 80)


def test_replies_of_allowed_flows_pass_both_ways(lab, pol):
    # both ends enforce both directions; only client -> server:80 is allowed
    pol(cnp("server", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: nobody}}]
"""))
    pol(cnp("client", """
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
"""))
    assert tcp(lab, "client", ip(lab, "server"), 80)  # SYN out, SYN-ACK and data back
    assert not tcp(lab, "server", ip(lab, "client"), 7000)  # but not a new flow back
    assert not tcp(lab, "client", ip(lab, "server"), 8080)


def _udp(lab, pod: str, port: int) -> socket.socket:
    sock = plumbing.run_in_netns(lab.pod(pod)["netns"],
                                 lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind(("0.0.0.0", port))
    sock.settimeout(1.5)
    return sock


def _received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recvfrom(100)[0]
    except TimeoutError:
        return None


def test_conntrack_entries_expire(lab, pol):
    """A UDP reply passes the client's enforced ingress only while the flow's conntrack
    entry lives (non-TCP lifetime set to 2 s for this lab)."""
    pol(cnp("udp", """
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "5000", protocol: UDP}]}]
"""))
    pol(cnp("client-closed", """
  endpointSelector: {matchLabels: {app: client}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
"""))
    client, server = _udp(lab, "client", 40000), _udp(lab, "server", 5000)
    try:
        client.sendto(b"hello", (ip(lab, "server"), 5000))
        assert _received(server) == b"hello"
        server.sendto(b"reply-1", (ip(lab, "client"), 40000))
        assert _received(client) == b"reply-1"  # a reply: conntrack lets it in
        time.sleep(CT_TIMEOUT_NON_TCP + 1.5)
        server.sendto(b"reply-2", (ip(lab, "client"), 40000))
        assert _received(client) is None  # entry expired: now it is a new, denied flow
        client.sendto(b"again", (ip(lab, "server"), 5000))
        assert _received(server) == b"again"
        server.sendto(b"reply-3", (ip(lab, "client"), 40000))
        assert _received(client) == b"reply-3"  # a fresh entry admits replies again
    finally:
        client.close()
        server.close()
