"""The vxlan plugin's BPF encapsulation (`encapsulation: bpf`) on crafted packets
(BPF_PROG_TEST_RUN), sharing a real datapath's pinned maps: VXLAN encapsulation byte by byte
(the wire format the kernel's VXLAN device speaks: UDP 8472, I flag, VNI), decapsulation
with the VNI as the source identity, and what the programs leave alone."""

from __future__ import annotations

import ctypes
import ipaddress
import secrets
import struct
import subprocess
from pathlib import Path

import pytest
from pylium.datapath import Datapath, libbpf
from pylium.datapath.maps.endpoints import EndpointInfoValue, EndpointKey
from pylium.datapath.packet import SkBuff, build
from pylium.policy.mapstate import PROTO_TCP, PROTO_UDP
from pylium_overlay_vxlan.backend import BPF_DIR, BPF_SOURCE

NODE_IP, PEER_IP = "192.168.101.11", "192.168.101.12"
LOCAL_POD, REMOTE_POD = "10.201.1.2", "10.201.2.3"
LOCAL_ID, REMOTE_ID = 0x012345, 777
POD_MAC, HOST_MAC = bytes.fromhex("0a0000000102"), bytes.fromhex("0a00000001ff")
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
PORT = 8472


def _csum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.fixture(scope="module")
def vxlan():
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True)
    root = Path(f"/sys/fs/bpf/pylium-test-vxlan-perf-{secrets.token_hex(3)}")
    dp = Datapath(root, cache_dir=Path("/tmp/pylium-test-bpf-cache")).open()
    try:
        dp.endpoints.update(EndpointKey.of(LOCAL_POD), EndpointInfoValue(
            41, 1, 0, LOCAL_ID, (ctypes.c_uint8 * 6)(*POD_MAC), (ctypes.c_uint8 * 6)(*HOST_MAC)))
        dp.upsert_ipcache(f"{REMOTE_POD}/32", REMOTE_ID, PEER_IP)
        obj = dp.load_object(BPF_DIR / BPF_SOURCE, {
            "VXLAN_IFINDEX": 0, "VXLAN_PORT": PORT,
            "NODE_IP": f"{int(ipaddress.IPv4Address(NODE_IP))}u"})
        yield obj.prog_fds
        obj.close()
    finally:
        dp.destroy()


def _run(fd: int, pkt: bytes) -> tuple[int, bytes, SkBuff]:
    retval, _ns, out, ctx = libbpf.test_run(fd, pkt, SkBuff(ifindex=1))
    return retval, out, ctx


def _outer(payload: bytes, dst: str = NODE_IP, port: int = PORT) -> bytes:
    udp = struct.pack("!HHHH", 50000, port, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(payload), 0, 0, 64,
                     PROTO_UDP, 0, ipaddress.IPv4Address(PEER_IP).packed,
                     ipaddress.IPv4Address(dst).packed)
    return b"\x02\0\0\0\0\x11" + b"\x02\0\0\0\0\x12" + b"\x08\x00" + ip + udp + payload


def test_pod_to_remote_pod_is_wrapped_in_vxlan_with_source_identity(vxlan):
    inner = build(LOCAL_POD, REMOTE_POD, PROTO_TCP, 40000, 80, payload=b"x" * 100)
    retval, out, _ctx = _run(vxlan["vxlan_egress"], inner)
    assert retval == TC_ACT_OK
    assert len(out) == len(inner) + 50
    assert out[:14] == inner[:14]  # outer Ethernet: what the stack's route chose
    ip = out[14:34]
    assert ip[0] == 0x45 and ip[9] == PROTO_UDP and _csum(ip) == 0
    assert struct.unpack("!H", ip[2:4])[0] == len(out) - 14
    assert ip[12:16] == ipaddress.IPv4Address(NODE_IP).packed
    assert ip[16:20] == ipaddress.IPv4Address(PEER_IP).packed
    sport, dport, ulen, ucsum = struct.unpack("!HHHH", out[34:42])
    assert dport == PORT and sport >= 0xC000 and ulen == len(out) - 34 and ucsum == 0
    flags, vni = struct.unpack("!II", out[42:50])
    assert flags == 0x08000000  # RFC 7348: I flag only
    assert vni >> 8 == LOCAL_ID and vni & 0xFF == 0  # VNI = source identity
    assert out[50:] == inner  # inner Ethernet frame untouched


def test_vxlan_to_this_node_is_unwrapped_and_delivered_with_vni_identity(vxlan):
    inner = build(REMOTE_POD, LOCAL_POD, PROTO_TCP, 80, 40000, payload=b"y" * 64)
    outer = _outer(struct.pack("!II", 0x08000000, REMOTE_ID << 8) + inner)
    retval, out, ctx = _run(vxlan["vxlan_ingress"], outer)
    assert retval == TC_ACT_REDIRECT
    assert out[:6] == POD_MAC and out[6:12] == HOST_MAC
    assert out[12:] == inner[12:]
    mark = ctx.mark
    assert mark & 0x0F00 == 0x0F00
    assert (mark >> 16) | ((mark & 0xFF) << 16) == REMOTE_ID


@pytest.mark.parametrize("case", ["plain-udp", "node-traffic", "not-for-us"])
def test_what_the_vxlan_programs_leave_alone(vxlan, case):
    if case == "plain-udp":  # UDP to the node, another port: not VXLAN
        pkt = build(PEER_IP, NODE_IP, PROTO_UDP, 5000, 53, payload=b"q" * 20)
        fd = vxlan["vxlan_ingress"]
    elif case == "node-traffic":  # the node's own packets are never wrapped
        pkt = build(NODE_IP, REMOTE_POD, PROTO_TCP, 1000, 80)
        fd = vxlan["vxlan_egress"]
    else:  # VXLAN port, other destination IP: not ours to unwrap
        pkt = build(PEER_IP, "192.168.101.13", PROTO_UDP, 5000, PORT, payload=b"\0" * 30)
        fd = vxlan["vxlan_ingress"]
    retval, out, _ctx = _run(fd, pkt)
    assert retval == TC_ACT_OK and out == pkt


@pytest.mark.parametrize("header", [struct.pack("!II", 0, REMOTE_ID << 8),  # no I flag
                                    struct.pack("!II", 0x08000000, 4242 << 8)])  # no such pod
def test_vxlan_without_a_vni_or_for_an_unknown_pod_is_dropped(vxlan, header):
    inner = build(REMOTE_POD, LOCAL_POD if header[0] == 0 else "10.201.1.99", PROTO_TCP, 80,
                  40000)
    retval, _out, _ctx = _run(vxlan["vxlan_ingress"], _outer(header + inner))
    assert retval == TC_ACT_SHOT
