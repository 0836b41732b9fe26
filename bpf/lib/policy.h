/* Per-endpoint policy: an outer hash (endpoint id -> inner LPM trie). The agent builds a
 * complete new inner trie and swaps the outer slot in one update, so traffic never sees an
 * empty or partial policy. The lookup is pylium.policy.mapstate.lookup, step for step.
 */
#ifndef PYLIUM_POLICY_H
#define PYLIUM_POLICY_H

#include "common.h"

#define POLICY_ENDPOINTS_MAX 16384
#define POLICY_ENTRIES_MAX 65536
#define POLICY_FULL_PREFIX 64

/* LPM key: prefixlen, then identity(32) direction(8) protocol(8) port(16), all in network
 * byte order. The identity is big-endian (unlike Cilium's host-order sec_label) so that the
 * trie branches on its high bits first: real identities (< 2^24) share a zero top byte and
 * the reserved meta key (0xFFFFFFFF) sits right under the root, one step away however many
 * identities the policy holds. Identities are always matched whole, so the order changes
 * no verdict. */
struct policy_key {
	__u32 prefixlen;
	__be32 identity;
	__u8 direction;
	__u8 protocol;
	__be16 dport;
};

#define POLICY_F_DENY 0x01
/* flags of the meta entry */
#define POLICY_META_INGRESS_ENFORCED 0x01
#define POLICY_META_EGRESS_ENFORCED 0x02
#define POLICY_META_INGRESS_WILDCARDS 0x04 /* there are identity-0 ingress entries */
#define POLICY_META_EGRESS_WILDCARDS 0x08

struct policy_entry {
	__u16 proxy_port;     /* host order; != 0: redirect to the L7 proxy */
	__u8 flags;           /* POLICY_F_DENY; meta entry: POLICY_META_* */
	__u8 lpm_prefix_len;  /* the key's prefix length (LPM lookups do not return it) */
	__u32 revision;       /* meta entry only: the EndpointPolicy revision */
};

/* Every inner map holds one meta entry under this reserved full-length key: which
 * directions are enforced and the policy revision (conntrack re-checks flows when it
 * changes). Identity 0xFFFFFFFF is never a real identity (the agent refuses it). */
#define POLICY_META_IDENTITY 0xFFFFFFFF
#define POLICY_META_DIRECTION 0xFF
#define POLICY_META_PROTOCOL 0xFF

struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, POLICY_ENTRIES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	/* sizes, not types: clang emits only a forward declaration for types seen solely
	 * through the inner map's pointers */
	__uint(key_size, sizeof(struct policy_key));
	__uint(value_size, sizeof(struct policy_entry));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, POLICY_ENDPOINTS_MAX);
	__type(key, __u32);
	__array(values, struct policy_inner);
} policy SEC(".maps");

#define VERDICT_NONE 0
#define VERDICT_ALLOW 1
#define VERDICT_DENY 2
#define VERDICT_REDIRECT 3

struct policy_verdict {
	__u8 verdict;
	__u8 deny_entry;  /* denied by an explicit deny entry (vs. default deny) */
	__u16 proxy_port;
};

static __always_inline struct policy_entry *policy_meta(void *inner)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.identity = POLICY_META_IDENTITY,
		.direction = POLICY_META_DIRECTION,
		.protocol = POLICY_META_PROTOCOL,
		.dport = 0xFFFF,
	};

	return bpf_map_lookup_elem(inner, &key);
}

static __always_inline struct policy_entry *policy_longest(void *inner, __u32 identity,
							    __u8 direction, __u8 protocol,
							    __be16 port)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.identity = bpf_htonl(identity),
		.direction = direction,
		.protocol = protocol,
		.dport = port,
	};
	return bpf_map_lookup_elem(inner, &key);
}

/* mapstate.lookup: unenforced -> allow; A = identity's longest match, B = wildcard's
 * (looked up only when the policy has wildcard entries in that direction); a deny in A or
 * B wins; else the longer prefix decides (A on a tie); proxy port ->
 * redirect; nothing -> default deny. */
static __always_inline struct policy_verdict policy_decide(void *inner,
							   struct policy_entry *meta,
							   __u32 identity, __u8 direction,
							   __u8 protocol, __be16 port)
{
	struct policy_verdict v = { .verdict = VERDICT_DENY };
	struct policy_entry *specific, *wildcard, *chosen;
	__u8 enforced = direction == DIR_INGRESS ? POLICY_META_INGRESS_ENFORCED
						 : POLICY_META_EGRESS_ENFORCED;
	__u8 wildcards = direction == DIR_INGRESS ? POLICY_META_INGRESS_WILDCARDS
						  : POLICY_META_EGRESS_WILDCARDS;

	if (!(meta->flags & enforced)) {
		v.verdict = VERDICT_ALLOW;
		return v;
	}
	specific = policy_longest(inner, identity, direction, protocol, port);
	wildcard = NULL;
	if (meta->flags & wildcards)
		wildcard = policy_longest(inner, IDENTITY_ANY, direction, protocol, port);
	if ((specific && (specific->flags & POLICY_F_DENY)) ||
	    (wildcard && (wildcard->flags & POLICY_F_DENY))) {
		v.deny_entry = 1;
		return v;
	}
	chosen = specific;
	if (wildcard && (!chosen || wildcard->lpm_prefix_len > chosen->lpm_prefix_len))
		chosen = wildcard;
	if (!chosen)
		return v;
	if (chosen->proxy_port) {
		v.verdict = VERDICT_REDIRECT;
		v.proxy_port = chosen->proxy_port;
	} else {
		v.verdict = VERDICT_ALLOW;
	}
	return v;
}

#endif
