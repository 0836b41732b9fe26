"""`wire_endpoint` / `unwire_endpoint` speak hand-packed rtnetlink: what they leave in the
kernel is checked here through pyroute2 and `ip`, both sides, from a thread that lives in
a node netns (as the agent's netlink threads do), which must still be there afterwards."""

from __future__ import annotations

import errno
import os
import secrets
import subprocess

import pytest
from pylium.datapath import netns as plumbing
from pyroute2 import NetlinkError


@pytest.fixture
def lab():
    tag = secrets.token_hex(3)
    node, pod = f"cni3-wn-{tag}", f"cni3-wp-{tag}"
    for ns in (node, pod):
        plumbing.create_netns(ns)
    try:
        yield node, pod
    finally:
        for ns in (pod, node):
            plumbing.remove_netns(ns)


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True,
                          text=True).stdout


def test_wire_and_unwire_both_sides(lab):
    node, pod = lab

    def wire():
        links = plumbing.wire_endpoint("lxcni3a", pod, "10.96.3.7", "10.96.3.1",
                                       pod_ifname="net7", mtu=1420)
        # the thread stepped into the pod to open its socket and came back
        assert _ns_inode("/proc/thread-self/ns/net") == _ns_inode(f"/run/netns/{node}")
        v6 = {name: (plumbing.read_sysctl(pod, f"net.ipv6.conf.{name}.disable_ipv6"))
              for name in ("default", "all", "net7")}
        v6["host"] = plumbing.read_sysctl(None, "net.ipv6.conf.lxcni3a.disable_ipv6")
        return links, v6

    links, v6 = plumbing.run_in_netns(node, wire)
    assert v6 == {"default": "1", "all": "1", "net7": "1", "host": "1"}
    host = plumbing.link_info("lxcni3a", node)
    assert host == links.host and host.up and host.ifindex > 0
    peer = plumbing.link_info("net7", pod)
    assert peer == links.pod and peer.up
    assert plumbing.link_mtu("net7", pod) == 1420 and plumbing.link_mtu("lxcni3a", node) == 1420
    assert plumbing.addresses("net7", pod) == ["10.96.3.7/32"]
    assert plumbing.neighbours("net7", pod) == {"10.96.3.1": host.mac}
    assert plumbing.neighbours("lxcni3a", node) == {"10.96.3.7": peer.mac}
    assert "default via 10.96.3.1 dev net7" in _ip(pod, "route") and "onlink" in _ip(pod, "route")
    assert {"dst": "10.96.3.7/32", "gateway": None, "oif": host.ifindex, "proto": 4} \
        in plumbing.routes(node)  # proto 4: static (what `ip route add` makes)
    assert "PERMANENT" in _ip(node, "neigh", "show", "dev", "lxcni3a")
    # traffic: the host side reaches the pod over the /32 route
    subprocess.run(["ip", "-n", node, "addr", "add", "10.96.3.1/32", "dev", "lxcni3a"],
                   check=True)
    subprocess.run(["ip", "netns", "exec", node, "ping", "-c1", "-W2", "10.96.3.7"],
                   check=True, capture_output=True)

    assert plumbing.run_in_netns(node, lambda: plumbing.unwire_endpoint("lxcni3a", "10.96.3.7"))
    assert plumbing.link_info("lxcni3a", node) is None and plumbing.link_info("net7", pod) is None
    assert not any(r["dst"] == "10.96.3.7/32" for r in plumbing.routes(node))
    assert not plumbing.run_in_netns(node,
                                     lambda: plumbing.unwire_endpoint("lxcni3a", "10.96.3.7"))


def test_unwire_removes_a_route_left_without_its_veth(lab):
    node, pod = lab
    plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint("lxcni3b", pod, "10.96.4.7",
                                                               "10.96.4.1"))
    plumbing.add_route("10.96.4.9/32", netns=node, ifname="lxcni3b")
    assert not plumbing.run_in_netns(node,
                                     lambda: plumbing.unwire_endpoint("lxcni3gone", "10.96.4.9"))
    assert not any(r["dst"] == "10.96.4.9/32" for r in plumbing.routes(node))
    assert plumbing.run_in_netns(node, lambda: plumbing.unwire_endpoint("lxcni3b", "10.96.4.7"))


def test_failed_wire_leaves_no_host_link(lab):
    node, pod = lab
    # the pod already has a link of that name: the peer cannot be born under it
    plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint("lxcni3c", pod, "10.96.5.7",
                                                               "10.96.5.1", pod_ifname="eth0"))
    with pytest.raises(NetlinkError) as failed:
        plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
            "lxcni3d", pod, "10.96.5.8", "10.96.5.1", pod_ifname="eth0"))
    assert failed.value.code == errno.EEXIST
    assert plumbing.link_info("lxcni3d", node) is None
    assert plumbing.link_info("lxcni3c", node) is not None
    # a host name that exists is refused, and the existing link is left alone
    with pytest.raises(NetlinkError):
        plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
            "lxcni3c", pod, "10.96.5.9", "10.96.5.1", pod_ifname="eth9"))
    assert plumbing.link_info("lxcni3c", node) is not None
    assert plumbing.link_info("eth9", pod) is None


def test_the_host_link_hook_runs_before_the_pod_end_comes_up(lab):
    """`on_host_link` (where the agent puts the datapath's programs) sees the host end made
    and the pod end still down with no address: the pod cannot send before it ran. A hook
    that fails leaves nothing behind."""
    node, pod = lab
    seen = {}

    def hook(host):
        seen["host"] = host
        seen["pod"] = plumbing.link_info("eth0", pod)
        seen["addresses"] = plumbing.addresses("eth0", pod)

    links = plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
        "lxcni3h", pod, "10.96.3.9", "10.96.3.1", on_host_link=hook))
    assert seen["host"] == links.host
    assert seen["pod"] is not None and not seen["pod"].up and seen["addresses"] == []
    assert plumbing.link_info("eth0", pod).up
    plumbing.run_in_netns(node, lambda: plumbing.unwire_endpoint("lxcni3h", "10.96.3.9"))

    def broken(_host):
        raise RuntimeError("no programs")

    with pytest.raises(RuntimeError, match="no programs"):
        plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
            "lxcni3h", pod, "10.96.3.9", "10.96.3.1", on_host_link=broken))
    assert plumbing.link_info("lxcni3h", node) is None
    assert plumbing.link_info("eth0", pod) is None


def test_the_address_is_waited_for_after_the_veth_and_its_hook(lab):
    """An address given as a callable (the agent allocates it on another thread meanwhile)
    is asked for once the veth is made and the hook ran, before the pod end comes up; an
    allocation that fails leaves nothing behind."""
    node, pod = lab
    order = []

    def hook(host):
        order.append(("hook", plumbing.link_info("lxcni3w", None) == host))

    def address():
        order.append(("address", plumbing.link_info("eth0", pod).up))
        return "10.96.6.7"

    links = plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
        "lxcni3w", pod, address, "10.96.6.1", on_host_link=hook))
    assert order == [("hook", True), ("address", False)]
    assert links.pod.up and plumbing.addresses("eth0", pod) == ["10.96.6.7/32"]
    plumbing.run_in_netns(node, lambda: plumbing.unwire_endpoint("lxcni3w", "10.96.6.7"))

    def exhausted():
        raise RuntimeError("pool exhausted")

    with pytest.raises(RuntimeError, match="pool exhausted"):
        plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
            "lxcni3w", pod, exhausted, "10.96.6.1"))
    assert plumbing.link_info("lxcni3w", node) is None
    assert plumbing.link_info("eth0", pod) is None


def test_the_pod_end_index_comes_from_the_host_end(lab, monkeypatch):
    """The host end's answer names its peer's index in the pod (IFLA_LINK): the pod side is
    configured without asking the pod's namespace for it (one round trip fewer per pod)."""
    node, pod = lab

    def asked(*_args):
        raise AssertionError("the pod end's index was asked for")

    monkeypatch.setattr(plumbing, "_get_link", asked)
    links = plumbing.run_in_netns(node, lambda: plumbing.wire_endpoint(
        "lxcni3i", pod, "10.96.7.7", "10.96.7.1"))
    assert plumbing.link_info("eth0", pod) == links.pod and links.pod.up
    assert plumbing.addresses("eth0", pod) == ["10.96.7.7/32"]
    plumbing.run_in_netns(node, lambda: plumbing.unwire_endpoint("lxcni3i", "10.96.7.7"))
