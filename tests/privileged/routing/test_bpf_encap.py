"""The overlay plugins' BPF encapsulation (geneve; vxlan with `encapsulation: bpf`; both built
on the core's `bpf/lib/encap.h`) on crafted packets (BPF_PROG_TEST_RUN), sharing a real
datapath's pinned maps: each wire format byte by byte, decapsulation with the VNI as the source
identity, what the programs leave alone and what they drop."""

from __future__ import annotations

import ctypes
import ipaddress
import secrets
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pylium.datapath import Datapath, libbpf
from pylium.datapath.maps.endpoints import EndpointInfoValue, EndpointKey
from pylium.datapath.packet import SkBuff, build
from pylium.policy.mapstate import PROTO_TCP, PROTO_UDP
from pylium_overlay_geneve import backend as geneve_backend
from pylium_overlay_vxlan import backend as vxlan_backend

NODE_IP, PEER_IP = "192.168.100.11", "192.168.100.12"
LOCAL_POD, REMOTE_POD = "10.200.1.2", "10.200.2.3"
LOCAL_ID, REMOTE_ID = 0x012345, 777
POD_MAC, HOST_MAC = bytes.fromhex("0a0000000102"), bytes.fromhex("0a00000001ff")
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as test-run reports it: on to the hook's next filter


def _geneve_header(vni: int, options: bytes = b"", version: int = 0) -> bytes:
    return (struct.pack("!BBH", (version << 6) | len(options) // 4, 0, 0x6558)
            + vni.to_bytes(3, "big") + b"\0" + options)


def _geneve_check(header: bytes) -> int:
    ver_opt, flags, proto = struct.unpack("!BBH", header[:4])
    assert (ver_opt, flags, proto) == (0, 0, 0x6558)
    assert header[7] == 0
    return int.from_bytes(header[4:7], "big")


def _vxlan_header(vni: int, flags: int = 0x08000000) -> bytes:
    return struct.pack("!II", flags, vni << 8)


def _vxlan_check(header: bytes) -> int:
    flags, vni = struct.unpack("!II", header)
    assert flags == 0x08000000  # RFC 7348: I flag only
    assert vni & 0xFF == 0
    return vni >> 8


@dataclass(frozen=True)
class Tunnel:
    name: str
    source: Path
    defines: dict
    port: int
    header: Callable[..., bytes]  # VNI -> the tunnel header
    check: Callable[[bytes], int]  # the tunnel header -> its VNI, asserting its other fields
    #: headers carrying REMOTE_ID the ingress program must accept (and remove whole)
    accepted: tuple = ()
    #: headers the ingress program must drop: (tunnel header, inner destination)
    refused: tuple = ()

    @property
    def egress(self) -> str:
        return f"{self.name}_egress"

    @property
    def ingress(self) -> str:
        return f"{self.name}_ingress"


TUNNELS = [
    Tunnel("geneve", geneve_backend.BPF_DIR / geneve_backend.BPF_SOURCE,
           {"GENEVE_PORT": 6081}, 6081, _geneve_header, _geneve_check,
           accepted=(_geneve_header(REMOTE_ID),  # and with one 8-byte option:
                     _geneve_header(REMOTE_ID, struct.pack("!HBB", 0x0104, 1, 1) + b"\0" * 4)),
           refused=((_geneve_header(REMOTE_ID, version=1), LOCAL_POD),  # unknown version
                    (_geneve_header(4242), "10.200.1.99"))),  # no such pod
    Tunnel("vxlan", vxlan_backend.BPF_DIR / vxlan_backend.BPF_SOURCE,
           {"VXLAN_IFINDEX": 0, "VXLAN_PORT": 8472}, 8472, _vxlan_header, _vxlan_check,
           accepted=(_vxlan_header(REMOTE_ID),),
           refused=((_vxlan_header(REMOTE_ID, flags=0), LOCAL_POD),  # no I flag: no VNI
                    (_vxlan_header(4242), "10.200.1.99"))),  # no such pod
]


def _csum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.fixture(scope="module", params=TUNNELS, ids=lambda t: t.name)
def tunnel(request):
    """(the tunnel, its loaded programs) over a datapath with one local pod and one remote."""
    t: Tunnel = request.param
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True)
    root = Path(f"/sys/fs/bpf/pylium-test-{t.name}-encap-{secrets.token_hex(3)}")
    dp = Datapath(root, cache_dir=Path("/tmp/pylium-test-bpf-cache")).open()
    try:
        dp.endpoints.update(EndpointKey.of(LOCAL_POD), EndpointInfoValue(
            41, 1, 0, LOCAL_ID, (ctypes.c_uint8 * 6)(*POD_MAC), (ctypes.c_uint8 * 6)(*HOST_MAC)))
        dp.upsert_ipcache(f"{REMOTE_POD}/32", REMOTE_ID, PEER_IP)
        obj = dp.load_object(t.source, {
            **t.defines, "NODE_IP": f"{int(ipaddress.IPv4Address(NODE_IP))}u"})
        yield t, obj.prog_fds
        obj.close()
    finally:
        dp.destroy()


def _run(fd: int, pkt: bytes) -> tuple[int, bytes, SkBuff]:
    retval, _ns, out, ctx = libbpf.test_run(fd, pkt, SkBuff(ifindex=1))
    return retval, out, ctx


def _outer(payload: bytes, port: int, dst: str = NODE_IP) -> bytes:
    udp = struct.pack("!HHHH", 50000, port, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0, 64,
                     PROTO_UDP, 0, ipaddress.IPv4Address(PEER_IP).packed,
                     ipaddress.IPv4Address(dst).packed)
    return b"\x02\0\0\0\0\x11" + b"\x02\0\0\0\0\x12" + b"\x08\x00" + ip + udp + payload


def test_pod_to_remote_pod_is_wrapped_with_the_source_identity(tunnel):
    t, progs = tunnel
    inner = build(LOCAL_POD, REMOTE_POD, PROTO_TCP, 40000, 80, payload=b"x" * 100)
    retval, out, _ctx = _run(progs[t.egress], inner)
    assert retval == TC_ACT_OK
    assert len(out) == len(inner) + 50  # outer IPv4 + UDP + an 8-byte tunnel header + Ethernet
    assert out[:14] == inner[:14]  # outer Ethernet: what the stack's route chose
    ip = out[14:34]
    assert ip[0] == 0x45 and ip[9] == PROTO_UDP and _csum(ip) == 0
    assert struct.unpack("!H", ip[2:4])[0] == len(out) - 14
    assert ip[12:16] == ipaddress.IPv4Address(NODE_IP).packed
    assert ip[16:20] == ipaddress.IPv4Address(PEER_IP).packed
    sport, dport, ulen, ucsum = struct.unpack("!HHHH", out[34:42])
    assert dport == t.port and sport >= 0xC000 and ulen == len(out) - 34 and ucsum == 0
    assert t.check(out[42:50]) == LOCAL_ID  # VNI = source identity
    assert out[50:] == inner  # inner Ethernet frame untouched


def test_tunnel_to_this_node_is_unwrapped_and_delivered_with_the_vni_identity(tunnel):
    t, progs = tunnel
    inner = build(REMOTE_POD, LOCAL_POD, PROTO_TCP, 80, 40000, payload=b"y" * 64)
    for header in t.accepted:
        retval, out, ctx = _run(progs[t.ingress], _outer(header + inner, t.port))
        assert retval == TC_ACT_REDIRECT
        assert out[:6] == POD_MAC and out[6:12] == HOST_MAC
        assert out[12:] == inner[12:]
        mark = ctx.mark
        assert mark & 0x0F00 == 0x0F00
        assert (mark >> 16) | ((mark & 0xFF) << 16) == REMOTE_ID


@pytest.mark.parametrize("case", ["plain-udp", "node-traffic", "not-for-us"])
def test_what_the_programs_leave_alone(tunnel, case):
    t, progs = tunnel
    if case == "plain-udp":  # UDP to the node, another port: not the tunnel
        pkt = build(PEER_IP, NODE_IP, PROTO_UDP, 5000, 53, payload=b"q" * 20)
        fd = progs[t.ingress]
    elif case == "node-traffic":  # the node's own packets are never wrapped
        pkt = build(NODE_IP, REMOTE_POD, PROTO_TCP, 1000, 80)
        fd = progs[t.egress]
    else:  # the tunnel port, another destination IP: not ours to unwrap
        pkt = build(PEER_IP, "192.168.100.13", PROTO_UDP, 5000, t.port, payload=b"\0" * 30)
        fd = progs[t.ingress]
    retval, out, _ctx = _run(fd, pkt)
    # egress lets the packet go on; ingress leaves it to the next filter (NodePort)
    assert retval == (TC_ACT_OK if fd == progs[t.egress] else TC_ACT_UNSPEC) and out == pkt


@pytest.mark.parametrize("which", [0, 1], ids=["bad-header", "unknown-pod"])
def test_a_bad_tunnel_header_or_an_unknown_pod_is_dropped(tunnel, which):
    t, progs = tunnel
    header, destination = t.refused[which]
    inner = build(REMOTE_POD, destination, PROTO_TCP, 80, 40000)
    retval, _out, _ctx = _run(progs[t.ingress], _outer(header + inner, t.port))
    assert retval == TC_ACT_SHOT


def test_an_inner_frame_that_is_not_ipv4_is_dropped(tunnel):
    t, progs = tunnel
    arp = b"\xff" * 6 + b"\x02\0\0\0\0\x21" + b"\x08\x06" + b"\0" * 28
    retval, _out, _ctx = _run(progs[t.ingress], _outer(t.header(REMOTE_ID) + arp, t.port))
    assert retval == TC_ACT_SHOT
