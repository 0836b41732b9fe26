"""The node side of redirecting flows to the L7 proxy (bpf/lib/proxy.h): the policy-routing
rule that delivers packets marked "to proxy" locally, so the socket bpf_sk_assign chose
receives them. The datapath installs it in the node netns when it attaches the first
endpoint's programs there (an agent without pods, e.g. one run in a host's root netns for a
CLI test, adds nothing) and keeps it across agent restarts like the programs that need it (a
running proxy keeps its connections); `Datapath.destroy()` and `pylium lab down` (with the
netns) remove it."""

from __future__ import annotations

from pylium.datapath import netns as plumbing
from pylium.datapath.marks import (
    MARK_MAGIC_MASK,
    MARK_MAGIC_TO_PROXY,
    PROXY_ROUTE_TABLE,
    PROXY_RULE_PRIORITY,
)

_RULE = (MARK_MAGIC_TO_PROXY, MARK_MAGIC_MASK, PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY)


def install_proxy_routing(netns: str | None = None) -> None:
    """`ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9` + `ip route replace local
    0.0.0.0/0 dev lo table 2004` in `netns` (None: the caller's, the agent's node netns)."""
    plumbing.add_fwmark_local_table(*_RULE, netns=netns)


def remove_proxy_routing(netns: str | None = None) -> bool:
    return plumbing.delete_fwmark_local_table(*_RULE, netns=netns)


def proxy_routing_state(netns: str | None = None) -> dict[str, bool]:
    return plumbing.fwmark_local_table_present(*_RULE, netns=netns)
