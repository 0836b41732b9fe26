"""The node side of redirecting flows to the L7 proxy (bpf/lib/proxy.h): the policy-routing
rule that delivers packets marked "to proxy" locally, so the socket bpf_sk_assign chose
receives them. The datapath installs it in the node netns when it attaches the first
endpoint's programs there (an agent without pods, e.g. one run in a host's root netns for a
CLI test, adds nothing) and keeps it across agent restarts like the programs that need it (a
running proxy keeps its connections); `Datapath.destroy()` and `pylium lab down` (with the
netns) remove it."""

from __future__ import annotations

import logging
import socket

from pylium.datapath import netns as plumbing
from pylium.datapath.marks import (
    MARK_MAGIC_MASK,
    MARK_MAGIC_TO_PROXY,
    PROXY_ROUTE_TABLE,
    PROXY_RULE_PRIORITY,
)

log = logging.getLogger(__name__)

EARLY_DEMUX = "net.ipv4.ip_early_demux"
ALL_RP_FILTER = "net.ipv4.conf.all.rp_filter"
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
    if plumbing.read_sysctl(netns, ALL_RP_FILTER) != "0":
        log.warning("%s is on in the node netns: flows an ingress policy redirects to the "
                    "L7 proxy from sources routed through other interfaces are dropped",
                    ALL_RP_FILTER)


def prepare_endpoint_veth(ifindex: int) -> None:
    """Let flows a pod's ingress policy redirects come back in through its host-side veth
    (in the caller's netns), whatever their source: `rp_filter` 0 (their source is routed
    elsewhere: another pod, the world) and `accept_local` 1 (a socket of the node itself
    opened them: the egress proxy's upstream, a node process; the kernel would drop that
    source as martian). Pods cannot use either to spoof: from_container drops any source
    but the endpoint's own address. (`net.ipv4.conf.all.rp_filter` 1 would still win:
    such flows are then dropped, never forwarded.)"""
    ifname = socket.if_indextoname(ifindex)
    plumbing.write_sysctl(None, f"net.ipv4.conf.{ifname}.rp_filter", "0")
    plumbing.write_sysctl(None, f"net.ipv4.conf.{ifname}.accept_local", "1")


def remove_proxy_routing(netns: str | None = None) -> bool:
    plumbing.write_sysctl(netns, EARLY_DEMUX, "1")  # the kernel's default
    return plumbing.delete_fwmark_local_table(*_RULE, netns=netns)


def proxy_routing_state(netns: str | None = None) -> dict[str, bool]:
    return plumbing.fwmark_local_table_present(*_RULE, netns=netns)
