"""The batched pod start and stop requests of `wire_endpoint` / `unwire_endpoint`, packed
by hand with `struct`: read back by pyroute2's own parser, every field the kernel acts on is
what the plumbing means (a wrong nesting, padding or flag would only show as a kernel
refusal)."""

import errno
import socket
import struct

from pylium.datapath import netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl


def _round_trip(request):
    data = netns._packed(request, 42)
    assert len(data) % 4 == 0
    (back,) = MarshalRtnl().parse(data)
    assert back["header"]["sequence_number"] == 42
    assert back["header"]["length"] == len(data)
    assert back["header"]["error"] is None
    return back


def test_veth_request_births_the_peer_in_the_pod_namespace():
    back = _round_trip(netns._new_veth("lxccni3b", "02:11:22:33:44:55", "eth0", 17,
                                       "02:aa:bb:cc:dd:ee", 1450))
    assert back["header"]["type"] == RTM_NEWLINK
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    assert back["flags"] & 1 and back["change"] & 1  # born up
    assert back.get_attr("IFLA_IFNAME") == "lxccni3b"
    assert back.get_attr("IFLA_MTU") == 1450
    assert back.get_attr("IFLA_ADDRESS") == "02:11:22:33:44:55"  # the host end's, ours too
    info = back.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0"
    assert peer.get_attr("IFLA_MTU") == 1450
    assert peer.get_attr("IFLA_NET_NS_FD") == 17
    assert peer.get_attr("IFLA_ADDRESS") == "02:aa:bb:cc:dd:ee"


def test_host_route_is_static_link_scope_in_main_table():
    back = _round_trip(netns._route(32, 253, 0, 12, dst="10.9.8.7"))
    assert back["header"]["type"] == RTM_NEWROUTE
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    assert (back["family"], back["dst_len"], back["table"]) == (socket.AF_INET, 32, 254)
    assert (back["proto"], back["scope"], back["type"]) == (4, 253, 1)  # static, link, unicast
    assert back.get_attr("RTA_DST") == "10.9.8.7"
    assert back.get_attr("RTA_OIF") == 12
    assert back.get_attr("RTA_GATEWAY") is None


def test_pod_default_route_is_onlink_via_the_gateway():
    back = _round_trip(netns._route(0, 0, 4, 3, gateway="10.9.8.1"))
    assert back["header"]["type"] == RTM_NEWROUTE
    assert (back["family"], back["dst_len"], back["table"]) == (socket.AF_INET, 0, 254)
    assert (back["proto"], back["scope"], back["type"], back["flags"]) == (4, 0, 1, 4)
    assert back.get_attr("RTA_DST") is None
    assert back.get_attr("RTA_GATEWAY") == "10.9.8.1"
    assert back.get_attr("RTA_OIF") == 3


def test_link_requests_name_the_link_by_name_or_index():
    back = _round_trip(netns._link_request(RTM_GETLINK, 0, "lxcabc"))
    assert back["header"]["type"] == RTM_GETLINK
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK
    assert (back["index"], back.get_attr("IFLA_IFNAME")) == (0, "lxcabc")
    back = _round_trip(netns._link_request(RTM_DELLINK, 0, "lxcabcdefghijkl"))  # 15 chars
    assert (back["header"]["type"], back.get_attr("IFLA_IFNAME")) == (RTM_DELLINK,
                                                                      "lxcabcdefghijkl")
    back = _round_trip(netns._link_request(RTM_SETLINK, 0, index=9, flags=1, change=1))
    assert (back["index"], back["flags"], back["change"]) == (9, 1, 1)
    assert back.get_attr("IFLA_IFNAME") is None


def _caught(monkeypatch):
    """The requests `_rtnl` / `_rtnl_each` would send, caught instead (each answered 0)."""
    requests = []

    def each(_sock, *batch, replies=None):
        requests.extend(batch)
        return [0] * len(batch)

    monkeypatch.setattr(netns, "_rtnl_each", each)
    return requests


def test_pod_address_is_a_slash_32(monkeypatch):
    requests = _caught(monkeypatch)
    monkeypatch.setattr(netns, "_get_link",
                        lambda _sock, name, mac: netns.LinkInfo(name, 7, mac, False))
    netns._configure_pod_side(None, "eth0", "02:00:00:00:00:02", "10.9.8.7", "10.9.8.1",
                              "02:00:00:00:00:01")
    kinds = [_round_trip(r)["header"]["type"] for r in requests]
    assert kinds == [RTM_SETLINK, RTM_NEWADDR, RTM_NEWNEIGH, RTM_NEWROUTE]
    up, address, neighbour, route = (_round_trip(r) for r in requests)
    assert (up["index"], up["flags"], up["change"]) == (7, 1, 1)
    assert address["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    assert (address["family"], address["prefixlen"], address["index"]) == (socket.AF_INET, 32, 7)
    assert address.get_attr("IFA_LOCAL") == address.get_attr("IFA_ADDRESS") == "10.9.8.7"
    assert (neighbour["ifindex"], neighbour.get_attr("NDA_DST")) == (7, "10.9.8.1")
    assert neighbour.get_attr("NDA_LLADDR") == "02:00:00:00:00:01"
    assert (route["flags"], route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_OIF")) == \
        (4, "10.9.8.1", 7)


def test_route_removal_is_any_scope_in_main_table(monkeypatch):
    requests = _caught(monkeypatch)
    assert netns.unwire_endpoint("lxcgone", "10.9.8.7")
    link, route = (_round_trip(r) for r in requests)
    assert (link["header"]["type"], link.get_attr("IFLA_IFNAME")) == (RTM_DELLINK, "lxcgone")
    assert route["header"]["type"] == RTM_DELROUTE
    assert (route["dst_len"], route["table"], route["scope"]) == (32, 254, 255)
    assert route.get_attr("RTA_DST") == "10.9.8.7"


def test_neighbour_is_permanent():
    back = _round_trip(netns._neigh(5, "10.9.8.1", "02:01:02:03:04:05"))
    assert back["header"]["type"] == RTM_NEWNEIGH
    assert back["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    assert (back["family"], back["ifindex"], back["state"]) == (socket.AF_INET, 5, 0x80)
    assert back.get_attr("NDA_DST") == "10.9.8.1"
    assert back.get_attr("NDA_LLADDR") == "02:01:02:03:04:05"


def test_a_links_u32_attribute_is_found_among_the_others():
    attrs = (netns._attr(3, b"lxcabc\0") + netns._attr(4, struct.pack("=I", 1500))
             + netns._attr(5, struct.pack("=I", 42)))
    reply = _answer(16, 1, struct.pack("=BxHiII", 0, 1, 7, 1, 0) + attrs)
    assert netns._u32_attr(reply, 5) == 42
    assert netns._u32_attr(reply, 4) == 1500
    assert netns._u32_attr(reply, 10) is None
    assert netns._u32_attr(reply[:-4], 5) is None  # cut short: not read past the end


def test_a_links_mac_is_the_one_the_kernel_answered():
    """The datapath takes the veth's MAC from the answer that made it (no ioctl later):
    the kernel's word, not the one we asked for; ours only when the answer has none."""
    header = struct.pack("=BxHiII", 0, 1, 9, 1, 0)
    asked = "02:00:00:00:00:01"
    reply = _answer(16, 1, header + netns._attr(3, b"lxcabc\0")
                    + netns._attr(1, bytes.fromhex("0a1b2c3d4e5f")))
    assert netns._link_of(reply, "lxcabc", asked).mac == "0a:1b:2c:3d:4e:5f"
    assert netns._link_of(_answer(16, 1, header), "lxcabc", asked).mac == asked


class _Kernel:
    """A socket whose answers are given datagrams (what `_rtnl_each` sends is kept)."""

    def __init__(self, *datagrams):
        self.datagrams = list(datagrams)
        self.sent = b""

    def send(self, data):
        self.sent += data

    def recv(self, _size):
        return self.datagrams.pop(0)


def _answer(kind, seq, payload):
    body = struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def test_answers_are_read_by_their_headers_across_datagrams():
    """ACKs and refusals by sequence number (in request order whatever order they come
    in, split over several reads), other answers handed back whole: a link's index and
    flags come from its fixed header."""
    seq = next(netns._SEQ) + 1  # the numbers the next three requests get
    link = _answer(16, seq + 1, struct.pack("=BxHiII", 0, 1, 37, 1, 0) + b"\x08\0\x03\0x\0\0\0")
    kernel = _Kernel(
        _answer(2, seq, struct.pack("=i", 0)) + _answer(2, seq + 99, struct.pack("=i", -1)),
        link + _answer(2, seq + 1, struct.pack("=i", 0)),
        _answer(2, seq + 2, struct.pack("=i", -errno.EEXIST)))
    replies = []
    requests = [netns._neigh(5, "10.9.8.1", "02:01:02:03:04:05") for _ in range(3)]
    assert netns._rtnl_each(kernel, *requests, replies=replies) == [0, 0, errno.EEXIST]
    assert replies == [link[:struct.unpack_from("=I", link)[0]]]
    got = netns._link_of(replies[0], "lxcx", "02:00:00:00:00:01")
    assert (got.ifindex, got.up, got.mac) == (37, True, "02:00:00:00:00:01")
    assert len(kernel.sent) == 3 * len(netns._packed(requests[0], 0))  # one send
