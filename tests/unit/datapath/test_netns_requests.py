"""The batched pod start requests of `wire_endpoint`, as built with pyroute2's message
classes: encoded and read back by pyroute2's own parser, every field the kernel acts on is
what the plumbing means (a wrong nesting or flag would only show as a kernel refusal)."""

import socket

from pylium.datapath import netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE
from pyroute2.netlink.rtnl.marshal import MarshalRtnl


def _round_trip(msg):
    msg["header"]["sequence_number"] = 42
    msg.encode()
    (back,) = MarshalRtnl().parse(msg.data)
    assert back["header"]["sequence_number"] == 42
    assert back["header"]["error"] is None
    return back


def test_veth_request_births_the_peer_in_the_pod_namespace():
    back = _round_trip(netns._new_veth("lxccni3b", "eth0", 17, "02:aa:bb:cc:dd:ee", 1450))
    assert back["header"]["type"] == RTM_NEWLINK
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    assert back["flags"] & 1 and back["change"] & 1  # born up
    assert back.get_attr("IFLA_IFNAME") == "lxccni3b"
    assert back.get_attr("IFLA_MTU") == 1450
    info = back.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0"
    assert peer.get_attr("IFLA_MTU") == 1450
    assert peer.get_attr("IFLA_NET_NS_FD") == 17
    assert peer.get_attr("IFLA_ADDRESS") == "02:aa:bb:cc:dd:ee"


def test_host_route_is_static_link_scope_in_main_table():
    back = _round_trip(netns._route(32, 253, 0, [("RTA_DST", "10.9.8.7"), ("RTA_OIF", 12)]))
    assert back["header"]["type"] == RTM_NEWROUTE
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    assert (back["family"], back["dst_len"], back["table"]) == (socket.AF_INET, 32, 254)
    assert (back["proto"], back["scope"], back["type"]) == (4, 253, 1)  # static, link, unicast
    assert back.get_attr("RTA_DST") == "10.9.8.7"
    assert back.get_attr("RTA_OIF") == 12


def test_neighbour_is_permanent():
    back = _round_trip(netns._neigh(5, "10.9.8.1", "02:01:02:03:04:05"))
    assert back["header"]["type"] == RTM_NEWNEIGH
    assert (back["family"], back["ifindex"], back["state"]) == (socket.AF_INET, 5, 0x80)
    assert back.get_attr("NDA_DST") == "10.9.8.1"
    assert back.get_attr("NDA_LLADDR") == "02:01:02:03:04:05"
