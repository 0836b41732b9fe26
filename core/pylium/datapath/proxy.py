"""The node side of redirecting flows to the L7 proxy (bpf/lib/proxy.h): the policy-routing
rule that delivers packets marked "to proxy" locally, so the socket bpf_sk_assign chose
receives them. The datapath installs it in the node netns when it attaches the first
endpoint's programs there (an agent without pods, e.g. one run in a host's root netns for a
CLI test, adds nothing) and keeps it across agent restarts like the programs that need it (a
running proxy keeps its connections); `Datapath.destroy()` and `pylium lab down` (with the
netns) remove it."""

from __future__ import annotations

import socket

from pylium.datapath import netns as plumbing
from pylium.datapath.marks import (
    MARK_MAGIC_MASK,
    MARK_MAGIC_TO_PROXY,
    PROXY_ROUTE_TABLE,
    PROXY_RULE_PRIORITY,
)

EARLY_DEMUX = "net.ipv4.ip_early_demux"
_RULE = (MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK, PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY)


def install_proxy_routing(netns: str | None = None) -> None:
    """`ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9` + `ip route replace local
    0.0.0.0/0 dev lo table 2004` in `netns` (None: the caller's, the agent's node netns),
    and IP early demux off there: the proxy's sockets hold pod addresses, so early demux
    would attach them to a redirected flow's later packets arriving from outside the node
    (before they reach the pod's program), and the kernel drops forwarded packets that
    carry a socket. Without early demux they are routed to the pod's veth, whose program
    sends them to the proxy like the first."""
    plumbing.add_fwmark_local_table(*_RULE, netns=netns)
    plumbing.write_sysctl(netns, EARLY_DEMUX, "0")


def accept_hairpinned_local_sources(ifindex: int) -> None:
    """`accept_local` on an endpoint's host-side veth (in the caller's netns): a flow that a
    socket of the node itself opened (the egress proxy's upstream, a node process) and that
    the pod's ingress policy redirects comes back in through this veth with a source
    address of the node, which the kernel otherwise drops as martian. Pods cannot use it to
    spoof the node: from_container drops any source but the endpoint's own address."""
    ifname = socket.if_indextoname(ifindex)
    plumbing.write_sysctl(None, f"net.ipv4.conf.{ifname}.accept_local", "1")


def remove_proxy_routing(netns: str | None = None) -> bool:
    plumbing.write_sysctl(netns, EARLY_DEMUX, "1")  # the kernel's default
    return plumbing.delete_fwmark_local_table(*_RULE, netns=netns)


def proxy_routing_state(netns: str | None = None) -> dict[str, bool]:
    return plumbing.fwmark_local_table_present(*_RULE, netns=netns)
