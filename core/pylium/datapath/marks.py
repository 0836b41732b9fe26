"""skb->mark values the datapath and the node's L7 proxy agree on: the Python twin of the
MARK_* defines and `mark_encode_identity`/`mark_decode_identity` of bpf/lib/common.h and
bpf/lib/proxy.h (tests/privileged/l7/test_redirect_marks.py runs the C functions to prove
them equal).

The proxy sets `SO_MARK = mark_encode_identity(client_identity)` on each upstream socket so
the destination's policy judges the real client, not "host" (Cilium marks proxy traffic the
same way). An egress proxy that wants the destination's own L7 ingress rules applied to its
upstream again uses `magic=MARK_MAGIC_PROXY_EGRESS`."""

from __future__ import annotations

MARK_MAGIC_MASK = 0x0F00
#: the source identity rides in the other bits; from a socket of the node: the L7 proxy
#: speaking for that identity (a redirect entry of the destination lets it through)
MARK_MAGIC_IDENTITY = 0x0F00
#: the same, but the destination applies its full ingress policy, L7 redirect included
MARK_MAGIC_PROXY_EGRESS = 0x0B00
#: to the L7 proxy, its port in the upper 16 bits (set by the datapath only)
MARK_MAGIC_TO_PROXY = 0x0200
#: BPF_PROG_TEST_RUN dry runs (`pylium policy trace --datapath`)
MARK_MAGIC_DRYRUN = 0x0D00

#: policy routing in the node netns: marked-to-proxy packets are delivered locally
#: (Cilium's table 2004 and rule priority 9)
PROXY_ROUTE_TABLE = 2004
PROXY_RULE_PRIORITY = 9

#: endpoint identities fit; local-scope (CIDR) identities (>= 2**24) do not: a proxy speaking
#: for such a client marks it as reserved:world (2): rules naming its CIDR then deny it
#: (fail closed), rules allowing the world still allow it
MAX_MARK_IDENTITY = (1 << 24) - 1


def mark_encode_identity(identity: int, magic: int = MARK_MAGIC_IDENTITY) -> int:
    """The mark carrying `identity` (24 bits: low 16 in the upper half, the rest in the
    low byte, Cilium's layout)."""
    if not 0 <= identity <= MAX_MARK_IDENTITY:
        raise ValueError(f"identity {identity} does not fit a mark (0..{MAX_MARK_IDENTITY})")
    if magic not in (MARK_MAGIC_IDENTITY, MARK_MAGIC_PROXY_EGRESS):
        raise ValueError(f"magic {magic:#x} does not carry an identity")
    return ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF) | magic


def mark_decode_identity(mark: int) -> int:
    return ((mark >> 16) & 0xFFFF) | ((mark & 0xFF) << 16)


def mark_encode_to_proxy(proxy_port: int) -> int:
    if not 0 < proxy_port <= 0xFFFF:
        raise ValueError(f"proxy port {proxy_port} outside 1..65535")
    return (proxy_port << 16) | MARK_MAGIC_TO_PROXY
