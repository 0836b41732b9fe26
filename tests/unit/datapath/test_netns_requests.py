"""The batched pod start requests of `wire_endpoint`, as built with pyroute2's message
classes: encoded and read back by pyroute2's own parser, every field the kernel acts on is
what the plumbing means (a wrong nesting or flag would only show as a kernel refusal)."""

import errno
import socket
import struct

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
    assert len(kernel.sent) == 3 * len(requests[0].data)  # one send for the batch
