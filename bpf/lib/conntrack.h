/* Connection tracking: one LRU hash shared by all endpoints. A flow gets one entry per
 * (direction, endpoint side) it was checked at, keyed by its original tuple; a packet
 * matching the reversed tuple of the other direction is a reply and passes without a
 * policy lookup. Expired entries count as absent; the agent's ct_gc deletes them. */
#ifndef PYLIUM_CONNTRACK_H
#define PYLIUM_CONNTRACK_H

#include "common.h"

#ifndef CT_MAX
#define CT_MAX 65536 /* -D CT_MAX: the agent's bpf_ct_global_max */
#endif

#ifndef CT_LIFETIME_TCP
#define CT_LIFETIME_TCP 21600
#endif
#ifndef CT_LIFETIME_NONTCP
#define CT_LIFETIME_NONTCP 60
#endif
#ifndef CT_LIFETIME_SYN
#define CT_LIFETIME_SYN 60
#endif
/* a TCP connection that saw FIN or RST: Cilium's (and netfilter's) 10 s, so closed
 * connections leave the table instead of filling it for a minute */
#ifndef CT_LIFETIME_FIN
#define CT_LIFETIME_FIN 10
#endif
#define NSEC_PER_SEC 1000000000ULL

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 direction; /* DIR_* of the endpoint that created the entry, or CT_DIR_SERVICE */
	__u16 pad;
};

#define CT_F_SEEN_REPLY 0x01
#define CT_F_CLOSING 0x02
#define CT_F_LOOPBACK 0x04 /* hairpinned service flow: source rewritten to LB_LOOPBACK_IP */

/* Service-scope entries (lib/lb.h): keyed by the original tuple towards the VIP, they
 * remember which backend the flow was sent to. */
#define CT_DIR_SERVICE 2
/* NodePort entries (keyed by the post-DNAT tuple client -> backend): the backend's reply
 * leaving its endpoint is rewritten back to the node's address and NodePort. */
#define CT_DIR_NODEPORT 3
/* NodePort SNAT entries (keyed by the tuple node address -> remote backend): the reply
 * coming back to the node is rewritten to the client (nat_addr) and the NodePort. */
#define CT_DIR_NODEPORT_SNAT 4

struct ct_entry {
	__u64 expires_ns;   /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 packets;
	__u64 bytes;
	__u32 src_identity;
	__u32 policy_rev;   /* revision of the endpoint policy that allowed the flow */
	__u16 ep_id;
	__u16 proxy_port;
	__u8 flags;
	__u8 tcp_flags_seen;
	__u16 rev_nat_index; /* != 0: a service flow; replies are rewritten back to its VIP */
	__u32 backend_id;    /* service-scope entries: the backend the flow goes to */
	__be32 nat_addr;     /* NodePort SNAT entries: the client's address */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} conntrack SEC(".maps");

#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2

static __always_inline __u64 ct_lifetime(const struct pkt *p, __u8 flags)
{
	if (p->protocol != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP * NSEC_PER_SEC;
	if (flags & CT_F_CLOSING)
		return CT_LIFETIME_FIN * NSEC_PER_SEC;
	if (flags & CT_F_SEEN_REPLY)
		return CT_LIFETIME_TCP * NSEC_PER_SEC;
	return CT_LIFETIME_SYN * NSEC_PER_SEC;
}

static __always_inline void ct_refresh(struct ct_entry *ct, const struct pkt *p, __u64 now,
				       int reply)
{
	__u8 flags = ct->flags, add = 0;

	if (reply)
		add |= CT_F_SEEN_REPLY;
	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		add |= CT_F_CLOSING;
	/* Flags are only ever added, and written only by the packet that adds one: packets of
	 * one flow run on several CPUs at once, and a data packet writing back the flags it
	 * read before a FIN was seen on another CPU would undo that FIN (the entry then
	 * outlived the connection by hours). */
	if ((flags | add) != flags)
		ct->flags = flags | add;
	if ((ct->tcp_flags_seen | p->tcp_flags) != ct->tcp_flags_seen)
		ct->tcp_flags_seen |= p->tcp_flags;
	ct->expires_ns = now + ct_lifetime(p, ct->flags);
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, p->len);
}

static __always_inline void ct_key_forward(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->protocol = p->protocol;
	k->direction = dir;
	k->pad = 0;
}

static __always_inline void ct_key_reverse(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	k->saddr = p->daddr;
	k->daddr = p->saddr;
	k->sport = p->dport;
	k->dport = p->sport;
	k->protocol = p->protocol;
	k->direction = dir ^ 1;
	k->pad = 0;
}

#endif
