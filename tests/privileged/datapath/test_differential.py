"""Differential test: for >= 10,000 random (policy, packet) cases, the verdict of the real
program (BPF_PROG_TEST_RUN on the attached from/to-container programs) equals
`pylium.policy.mapstate.lookup` — zero mismatches — and the program does what the verdict
says, strictly: drop (with the reason), deliver to the local pod by bpf_redirect to its veth
(`redirected`, target = that veth; every allowed egress flow to the node's second pod),
pass to the stack (`forwarded`, every other allowed flow), or send the flow to the L7 proxy
on the policy's proxy port (which does not run here, so a real packet redirected to it is
dropped: fail closed). Every one of these outcomes is reached >= 50 times."""

from __future__ import annotations

import random

from pylium.datapath.packet import build
from pylium.datapath.testrun import decode_result
from pylium.policy.mapstate import (
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    Verdict,
    lookup,
    port_mask,
)

POLICIES = 100
PACKETS_PER_POLICY = 110
REAL_MODE_SHARE = 0.25  # the rest are dry runs (trace): same code, no conntrack writes
#: peer identities: reserved (host, world), endpoints, and CIDR (local-scope) identities
IDENTITIES = [1, 2, 1000, 1001, 1002, 1003, 1004, 16777217, 16777218]
PORTS = [0, 1, 22, 53, 80, 443, 1023, 1024, 5000, 8080, 8443, 65535]
ICMP_TYPES = [0, 3, 8, 11]
MARK_MAGIC_IDENTITY = 0x0F00
PROXIED_SHARE = 0.3  # of real ingress packets: sent by the node's L7 proxy (a node socket)
DROP_PROXY_LOOKUP_FAILED, DROP_PROXY_UNKNOWN_PROTO = 178, 180


#: the identity of the second pod on the node: packets to it go to its real address, so an
#: allowed egress flow is delivered by bpf_redirect to its veth ("redirected")
LOCAL_PEER, LOCAL_PEER_IP = 1001, "10.98.0.11"


def peer_ip(identity: int) -> str:
    if identity == LOCAL_PEER:
        return LOCAL_PEER_IP
    return "203.0.113.7" if identity == 2 else f"10.99.{identity % 251}.{identity % 7 + 1}"


def random_port(rng: random.Random) -> int:
    return rng.choice(PORTS) if rng.random() < 0.6 else rng.randrange(65536)


def random_policy(rng: random.Random, revision: int) -> EndpointPolicy:
    entries = {}
    for _ in range(rng.choice([0, 1, 3, 8, 20, 60])):
        identity = 0 if rng.random() < 0.3 else rng.choice(IDENTITIES)
        direction = rng.choice(list(Direction))
        protocol = rng.choice([PROTO_ANY, PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP])
        if protocol == PROTO_ANY:
            port, plen = 0, 0
        elif protocol == PROTO_ICMP:
            plen = rng.choice([0, 16, 16])
            port = rng.choice(ICMP_TYPES) if plen else 0
        else:
            plen = rng.choice([0, 16, 16, 16, 12, 8, 15, 4])
            port = random_port(rng) & port_mask(plen)
        entry = PolicyEntry(deny=rng.random() < 0.2,
                            proxy_port=rng.choice([0, 0, 0, 0, 15001, 15002]))
        if entry.deny:
            entry = PolicyEntry(deny=True)
        entries[PolicyKey(identity, direction, protocol, port, plen)] = entry
    return EndpointPolicy(ingress_enforced=rng.random() < 0.85,
                          egress_enforced=rng.random() < 0.85, entries=entries,
                          revision=revision)


def expected(want, direction: Direction, identity: int, proto: int, real: bool,
             proxied: bool) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """(actions, drop reasons, proxy port) the program may report for a case."""
    if want.verdict == Verdict.DENY:
        return ("dropped",), (133, 181), want.proxy_port
    # to a local pod: bpf_redirect to its veth (a dry run answers TC_ACT_REDIRECT too);
    # anything else is passed to the stack
    local = direction == Direction.EGRESS and identity == LOCAL_PEER
    forward = ("redirected",) if local else ("forwarded",)
    if want.verdict == Verdict.ALLOW:
        return forward, (0,), 0
    if proxied:  # the proxy already judged this identity's L7 rules: no second redirect
        return forward, (0,), 0
    if proto != PROTO_TCP:
        return ("dropped",), (DROP_PROXY_UNKNOWN_PROTO,), want.proxy_port
    if real and direction == Direction.EGRESS:  # nothing listens on the proxy port here
        return ("dropped",), (DROP_PROXY_LOOKUP_FAILED,), want.proxy_port
    # dry run, or ingress: to_container hairpins it to the veth's ingress (where
    # from_container looks the proxy socket up)
    return ("to-proxy",), (0,), want.proxy_port


def test_kernel_verdicts_equal_mapstate_lookup(node):
    pods = {"ep": ("10.98.0.10", 1500), "peer": (LOCAL_PEER_IP, LOCAL_PEER)}
    n = node("diff", pods)
    ep, ep_ip = n.eps["ep"], pods["ep"][0]
    for identity in IDENTITIES:
        if identity not in (2, LOCAL_PEER):  # world: no entry; the pod: endpoints map
            n.dp.upsert_ipcache(f"{peer_ip(identity)}/32", identity)
    rng = random.Random(20260404)

    def run_cases(policy: EndpointPolicy, cases) -> list:
        out = []
        for direction, identity, proto, port, real, sport, proxied in cases:
            peer = peer_ip(identity)
            icmp = proto == PROTO_ICMP
            if not real:
                if direction == Direction.EGRESS:
                    r = n.raw.trace(ep.ep_id, "egress", ep_ip, peer, 7 if icmp else sport, port, proto)
                else:
                    r = n.raw.trace(ep.ep_id, "ingress", peer, ep_ip, 7 if icmp else sport, port,
                                    proto, src_identity=identity)
            else:
                if direction == Direction.EGRESS:
                    prog, pkt, mark = "from_container", build(ep_ip, peer, proto, sport, port), 0
                else:
                    prog, pkt = "to_container", build(peer, ep_ip, proto, sport, port)
                    mark = ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF) | MARK_MAGIC_IDENTITY
                # received on a peer's veth, or (proxied) sent by a socket of the node
                retval, ctx, _ = n.raw.run_program(
                    prog, pkt, ep.ifindex, mark=mark,
                    ingress_ifindex=0 if proxied else n.eps["peer"].ifindex)
                r = decode_result(retval, ctx, prog, direction)
            out.append(r)
        return out

    mismatches, total, sport = [], 0, 1024
    seen_verdicts: dict[str, int] = {}
    seen_actions: dict[str, int] = {}
    for p in range(POLICIES):
        policy = random_policy(rng, revision=p + 1)
        n.dp.update_policy(ep.ep_id, policy)
        cases = []
        for _ in range(PACKETS_PER_POLICY):
            direction = rng.choice(list(Direction))
            real = rng.random() < REAL_MODE_SHARE
            # skb->mark carries 24 bits of identity between endpoints (as in Cilium): only
            # endpoint identities travel that way, CIDR identities come from the ipcache
            identity = rng.choice([i for i in IDENTITIES if not real or i < 1 << 24
                                   or direction == Direction.EGRESS])
            proto = rng.choice([PROTO_TCP, PROTO_UDP] if real else
                               [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP])
            port = rng.choice(ICMP_TYPES) if proto == PROTO_ICMP else random_port(rng)
            sport = sport + 1 if sport < 65000 else 1024  # fresh flows: no conntrack hits
            proxied = real and direction == Direction.INGRESS and rng.random() < PROXIED_SHARE
            cases.append((direction, identity, proto, port, real, sport, proxied))
        results = n.worker.run(run_cases, policy, cases)
        for case, got in zip(cases, results, strict=True):
            direction, identity, proto, port, real, _, proxied = case
            want = lookup(policy, identity, direction, proto, port)
            action, reason, proxy_port = expected(want, direction, identity, proto, real,
                                                  proxied)
            target = n.eps["peer"].ifindex if got["action"] == "redirected" else 0
            ok = (got["verdict"] == want.verdict.value and got["proxy_port"] == proxy_port
                  and got["action"] in action and got["drop_reason"] in reason
                  and got["peer_identity"] == identity and got["ct"] == "new"
                  and (not target or got["target_ifindex"] == target))
            total += 1
            seen_verdicts[want.verdict.value] = seen_verdicts.get(want.verdict.value, 0) + 1
            seen_actions[got["action"]] = seen_actions.get(got["action"], 0) + 1
            if not ok:
                mismatches.append((policy, case, want, got))
    assert total >= 10_000
    # the random policies exercise every outcome, not just default deny
    assert min(seen_verdicts.get(v.value, 0) for v in Verdict) >= 500, seen_verdicts
    # and every action: delivery to the local pod, to the stack, to the proxy, drops
    assert min(seen_actions.get(a, 0) for a in ("redirected", "forwarded", "to-proxy",
                                                "dropped")) >= 50, seen_actions
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"
