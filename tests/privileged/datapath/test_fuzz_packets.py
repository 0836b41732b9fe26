"""Random packets through every endpoint BPF program (BPF_PROG_TEST_RUN), for real (CT,
events and metrics written) and as dry runs: the kernel runs each one (no verifier or
runtime failure), and each packet is passed, redirected or dropped — a drop always with a
reason in cb[0]. Packets: pure noise, truncated frames, and well-formed Ethernet/IPv4 with
every field at random (IHL, fragments, lengths, protocols, TCP flags, ports), from and to
the pods, under allow-all, deny-all and a port-specific policy. `PYLIUM_FUZZ_PACKETS` sets
how many per program and mode (default 1500 here; the bench runs more)."""

from __future__ import annotations

import os
import random
import struct

from pylium.datapath.libbpf import DatapathError
from pylium.datapath.maps.metrics import reason_name
from pylium.datapath.packet import build
from pylium.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey

PODS = {"a": ("10.213.0.10", 1101), "b": ("10.213.0.11", 1102)}
PACKETS = int(os.environ.get("PYLIUM_FUZZ_PACKETS", "1500"))


def random_packet(rng: random.Random, ips: list[str]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(14, 200))  # noise (the kernel wants >= ETH_HLEN)
    src, dst = rng.choice(ips), rng.choice(ips)
    proto = rng.choice((1, 6, 17, 132, 47, 0, 255, rng.randrange(256)))
    pkt = bytearray(build(src, dst, proto if proto in (1, 6, 17, 132) else 6,
                          rng.randrange(65536), rng.randrange(256 if proto == 1 else 65536),
                          tcp_flags=rng.randrange(256), payload=rng.randbytes(rng.randint(0, 64))))
    pkt[14 + 9] = proto
    if kind >= 2:  # scramble IPv4 header fields
        pkt[14] = rng.choice((0x45, 0x46, 0x4F, 0x40, 0x44, 0x65, rng.randrange(256)))
        struct.pack_into("!H", pkt, 14 + 2, rng.choice((0, 20, 21, len(pkt) - 14, 65535,
                                                         rng.randrange(65536))))
        struct.pack_into("!H", pkt, 14 + 6, rng.choice((0, 0x2000, 0x4000, 1, 0x1FFF,
                                                         rng.randrange(65536))))
        if rng.random() < 0.3:
            pkt[12:14] = rng.choice((b"\x86\xdd", b"\x08\x06", b"\x81\x00", rng.randbytes(2)))
    if kind == 3:  # truncate anywhere after the Ethernet header
        del pkt[rng.randint(14, len(pkt)):]
    return bytes(pkt)


def _l3_header_cut(pkt: bytes) -> bool:
    ethertype = pkt[12:14]
    need = {b"\x08\x00": 20, b"\x86\xdd": 40}.get(ethertype)
    return need is not None and len(pkt) - 14 < need


def test_random_packets_through_every_program(node):
    n = node("fuzzpkt", PODS)
    a_id, b_id = PODS["a"][1], PODS["b"][1]
    allow_all = EndpointPolicy(True, True, {PolicyKey(0, Direction.INGRESS): PolicyEntry(),
                                             PolicyKey(0, Direction.EGRESS): PolicyEntry()}, 1)
    deny_all = EndpointPolicy(True, True, {}, 2)
    port_80 = EndpointPolicy(True, True, {
        PolicyKey(a_id, Direction.INGRESS, 6, 80, 16): PolicyEntry(),
        PolicyKey(b_id, Direction.EGRESS, 17, 53, 16): PolicyEntry()}, 3)
    programs = sorted(n.raw.prog_fds)
    assert {"from_container", "to_container"} <= set(programs), programs
    rng = random.Random(int(os.environ.get("PYLIUM_FUZZ_SEED", "15")))
    ips = [ip for ip, _ in PODS.values()] + ["1.1.1.1", "0.0.0.0", "255.255.255.255",
                                             "10.213.0.1", "127.0.0.1"]
    seen: dict[str, int] = {}
    runs = 0
    for policy in (allow_all, deny_all, port_80):
        for ep in n.eps.values():
            n.dp.update_policy(ep.ep_id, policy)
        for program in programs:
            for i in range(PACKETS // 3):
                ep = rng.choice(list(n.eps.values()))
                pkt = random_packet(rng, ips)
                dry = i % 2 == 1
                runs += 1
                try:
                    retval, ctx, _ = n.worker.run(n.raw.run_program, program, pkt, ep.ifindex,
                                                  dry_run=dry, src_identity=b_id if dry else None)
                except DatapathError as exc:
                    # the kernel refuses to build an skb whose L3 header is cut short
                    # (bpf_prog_test_run_skb checks it) before any program runs
                    assert "errno 22" in str(exc) and _l3_header_cut(pkt), \
                        f"{program} dry={dry} {pkt.hex()}: {exc}"
                    seen["refused by the kernel (L3 header cut short)"] = seen.get(
                        "refused by the kernel (L3 header cut short)", 0) + 1
                    continue
                assert retval in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT), \
                    (program, retval, pkt.hex())
                if retval == TC_ACT_SHOT:
                    assert ctx.cb[0] != 0 and reason_name(ctx.cb[0]), \
                        f"{program} dropped without a reason: {pkt.hex()}"
                    key = f"dropped:{reason_name(ctx.cb[0])}"
                else:
                    key = {TC_ACT_OK: "passed", TC_ACT_REDIRECT: "redirected"}[retval]
                seen[key] = seen.get(key, 0) + 1
    assert runs >= PACKETS * len(programs) - 3 * len(programs)
    # the mix reached both outcomes, and the policy drop among the reasons
    assert seen.get("passed", 0) + seen.get("redirected", 0) > 0 and \
        any(k.startswith("dropped:") for k in seen), seen
    print(f"{runs} random packets through {len(programs)} programs: {seen}")
