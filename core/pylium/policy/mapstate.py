"""The per-endpoint policy map state: the contract between the policy engine (which computes
it) and the datapath (which stores it in a BPF LPM trie and looks packets up in it).

A key is (identity or 0 = any, direction, protocol or 0 = any, port prefix). In the BPF LPM
trie the bits are ordered identity(32) direction(8) protocol(8) port(16, network order), so
`lpm_prefixlen` = 40 + 8 if a protocol is given + the port prefix length. Port ranges
(`endPort`) become several aligned power-of-two blocks. ICMP rules use the ICMP type as port.

`lookup` below *is* the datapath's algorithm, written once in Python; `bpf/lib/policy.h`
implements the same steps and the differential tests hold them equal:

1. A direction that is not enforced allows everything.
2. A = longest-prefix match among entries for the packet's identity; B = the same among
   identity-0 (wildcard) entries.
3. If A or B is a deny entry: DENY.
4. Otherwise the one with the longer prefix decides (A on a tie): ALLOW, or REDIRECT to
   its proxy port when it has one.
5. Nothing matched: DENY (default deny in an enforced direction).

Step 3 only sees the longest match per identity, so the resolver guarantees that an allow
entry covered by a deny entry of the same identity is itself stored as a deny.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping

import attrs

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

PROTOCOL_NUMBERS = {"ANY": PROTO_ANY, "TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP,
                    "ICMP": PROTO_ICMP, "ICMPV6": PROTO_ICMPV6}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items()}

#: bits of the key before the protocol: identity (32) + direction (8)
L3_PREFIX_BITS = 40
FULL_PREFIX_BITS = 64

IDENTITY_ANY = 0


class Direction(enum.IntEnum):
    INGRESS = 0
    EGRESS = 1


class Verdict(enum.Enum):
    ALLOW = "allowed"
    DENY = "denied"
    REDIRECT = "redirected"


@attrs.frozen(order=True)
class PolicyKey:
    identity: int
    direction: Direction
    protocol: int = PROTO_ANY
    port: int = 0
    port_prefix_len: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.port_prefix_len <= 16:
            raise ValueError(f"port prefix length {self.port_prefix_len} outside 0..16")
        if self.protocol == PROTO_ANY and (self.port or self.port_prefix_len):
            raise ValueError("a key with protocol ANY cannot carry a port")
        mask = port_mask(self.port_prefix_len)
        if self.port & ~mask & 0xFFFF:
            raise ValueError(f"port {self.port} has bits outside its /{self.port_prefix_len}")

    @property
    def lpm_prefixlen(self) -> int:
        if self.protocol == PROTO_ANY:
            return L3_PREFIX_BITS
        return L3_PREFIX_BITS + 8 + self.port_prefix_len

    def covers(self, other: PolicyKey) -> bool:
        """True if every packet matching `other` also matches this key (same identity)."""
        if (self.identity, self.direction) != (other.identity, other.direction):
            return False
        if self.protocol == PROTO_ANY:
            return True
        if self.protocol != other.protocol or self.port_prefix_len > other.port_prefix_len:
            return False
        mask = port_mask(self.port_prefix_len)
        return (other.port & mask) == self.port

    def matches(self, identity: int, direction: Direction, protocol: int, port: int) -> bool:
        if self.identity != identity or self.direction != direction:
            return False
        if self.protocol == PROTO_ANY:
            return True
        if self.protocol != protocol:
            return False
        return (port & port_mask(self.port_prefix_len)) == self.port

    @property
    def port_range(self) -> tuple[int, int]:
        """First and last port this key matches (0, 65535 for any)."""
        span = 1 << (16 - self.port_prefix_len)
        return self.port, self.port + span - 1


@attrs.frozen
class PolicyEntry:
    deny: bool = False
    proxy_port: int = 0
    #: names of the rules that produced this entry (for `bpf policy get` and tracing)
    derived_from: tuple[str, ...] = attrs.field(default=(), eq=False)


@attrs.frozen
class EndpointPolicy:
    """Everything the datapath needs to enforce one endpoint's policy."""

    ingress_enforced: bool
    egress_enforced: bool
    entries: Mapping[PolicyKey, PolicyEntry] = attrs.field(factory=dict)
    revision: int = 0
    #: for each redirect entry, the L7 allows that apply to it (`resolve.L7Grant`s): what
    #: the L7 proxy judges requests against; not part of the datapath's map
    l7: Mapping[PolicyKey, tuple] = attrs.field(factory=dict, eq=False)

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction == Direction.INGRESS else self.egress_enforced


@attrs.frozen
class Decision:
    verdict: Verdict
    proxy_port: int = 0
    #: the key whose entry decided, None for "not enforced" or default deny
    key: PolicyKey | None = None
    reason: str = ""


def port_mask(prefix_len: int) -> int:
    return (0xFFFF << (16 - prefix_len)) & 0xFFFF if prefix_len else 0


def port_range_blocks(first: int, last: int) -> Iterator[tuple[int, int]]:
    """Split [first, last] into the fewest aligned (port, prefix_len) blocks."""
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"bad port range {first}-{last}")
    port = first
    while port <= last:
        size_bits = 16
        while size_bits > 0:
            span = 1 << size_bits
            if port % span == 0 and port + span - 1 <= last:
                break
            size_bits -= 1
        yield port, 16 - size_bits
        port += 1 << size_bits


def _longest(entries: Mapping[PolicyKey, PolicyEntry], identity: int, direction: Direction,
             protocol: int, port: int) -> tuple[PolicyKey, PolicyEntry] | None:
    best: tuple[PolicyKey, PolicyEntry] | None = None
    for key, entry in entries.items():
        if key.matches(identity, direction, protocol, port):
            if best is None or key.lpm_prefixlen > best[0].lpm_prefixlen:
                best = (key, entry)
    return best


def lookup(policy: EndpointPolicy, identity: int, direction: Direction, protocol: int,
           port: int) -> Decision:
    """The datapath's policy decision for one packet (see the module docstring)."""
    if not policy.enforced(direction):
        return Decision(Verdict.ALLOW, reason="policy not enforced in this direction")
    specific = _longest(policy.entries, identity, direction, protocol, port)
    wildcard = _longest(policy.entries, IDENTITY_ANY, direction, protocol, port)
    for hit in (specific, wildcard):
        if hit is not None and hit[1].deny:
            return Decision(Verdict.DENY, key=hit[0], reason="denied by a deny entry")
    chosen = specific
    if wildcard is not None and (
        chosen is None or wildcard[0].lpm_prefixlen > chosen[0].lpm_prefixlen
    ):
        chosen = wildcard
    if chosen is None:
        return Decision(Verdict.DENY, reason="no entry matched (default deny)")
    key, entry = chosen
    if entry.proxy_port:
        return Decision(Verdict.REDIRECT, proxy_port=entry.proxy_port, key=key,
                        reason="redirected to the L7 proxy")
    return Decision(Verdict.ALLOW, key=key, reason="allowed by an allow entry")


def deny_unserved_redirects(policy: EndpointPolicy,
                            served_ports: set[int]) -> tuple[EndpointPolicy, list[PolicyKey]]:
    """Fail closed for L7 rules no proxy can enforce: every redirect entry whose proxy port
    no running L7 proxy serves becomes a deny entry (the L7 rules must never turn into an
    L4 allow). Returns the policy to load and the keys that were turned."""
    turned = [k for k, e in policy.entries.items()
              if not e.deny and e.proxy_port and e.proxy_port not in served_ports]
    if not turned:
        return policy, []
    entries = dict(policy.entries)
    for key in turned:
        entries[key] = PolicyEntry(deny=True, derived_from=entries[key].derived_from)
    return attrs.evolve(policy, entries=entries), turned
