/* Service load balancing (ClusterIP): the layout follows Cilium's lib/lb.h.
 *
 *   lb4_services    (VIP, dport, proto, slot) -> service entry. Slot 0 is the master entry
 *                   (backend count, algorithm, flags, affinity timeout); slots 1..count
 *                   name one backend each (what `random` picks from).
 *   lb4_backends    backend id -> (address, port, proto, state)
 *   lb4_reverse_nat rev-NAT index (the service id) -> (VIP, port): replies are rewritten
 *                   back to it
 *   lb4_maglev      rev-NAT index -> the service's Maglev lookup table (an array of backend
 *                   ids, computed by the agent; every node computes the same one)
 *   lb4_affinity    (client IP, rev-NAT index) -> (backend, last use): ClientIP affinity
 *
 * A new connection to a VIP picks a backend once; the choice is remembered in the shared
 * conntrack map under a service-scope entry keyed by the original (pre-DNAT) tuple, so
 * every later packet of the flow goes to the same backend even when the backend set
 * changes. The endpoint's own conntrack entry (post-DNAT tuple) carries the rev-NAT index:
 * the reply found as CT_REPLY in to_container is rewritten back to the VIP.
 *
 * Hairpin (a pod reaching itself through its service): the source is rewritten to
 * LB_LOOPBACK_IP as well, since a pod drops packets whose source is its own address; the
 * reply to LB_LOOPBACK_IP is turned back around for the same pod. */
#ifndef PYLIUM_LB_H
#define PYLIUM_LB_H

#include "common.h"
#include "conntrack.h"

#define LB_SERVICES_MAX 65536
#define LB_BACKENDS_MAX 65536
#define LB_REVNAT_MAX 65536
#define LB_MAGLEV_SERVICES_MAX 4096
#define LB_AFFINITY_MAX 65536
#ifndef LB_MAGLEV_TABLE_MAX
#define LB_MAGLEV_TABLE_MAX 131071 /* the largest table size Cilium allows */
#endif

/* 169.254.42.1, Cilium's IPV4_LOOPBACK: the source of hairpinned service traffic */
#define LB_LOOPBACK_IP bpf_htonl(0xA9FE2A01)

#define DROP_NO_SERVICE 158 /* "Service backend not found" */

/* master flags */
#define SVC_F_NODEPORT 0x01
#define SVC_F_LOCAL 0x02      /* externalTrafficPolicy: Local */
#define SVC_F_AFFINITY 0x04   /* sessionAffinity: ClientIP */

#define LB_ALG_RANDOM 0
#define LB_ALG_MAGLEV 1

/* backend states (Cilium's BackendState) */
#define BE_ACTIVE 0
#define BE_TERMINATING 1
#define BE_QUARANTINED 2
#define BE_MAINTENANCE 3

struct lb4_key {
	__be32 address;     /* service VIP */
	__be16 dport;       /* service port */
	__u16 backend_slot; /* 0 = master entry */
	__u8 proto;
	__u8 scope;         /* reserved (Cilium: external/internal traffic policy scope) */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;       /* slot > 0: the backend; master: affinity timeout (seconds) */
	__u16 count;            /* master: backend slots 1..count */
	__u16 rev_nat_index;    /* the service id */
	__u8 flags;             /* master: SVC_F_* */
	__u8 algorithm;         /* master: LB_ALG_* */
	__u16 pad;
	__u32 lut_size;         /* master, maglev: entries in the lookup table */
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;  /* BE_* state */
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct lb4_affinity_key {
	__be32 client_ip;
	__u16 rev_nat_index;
	__u16 pad;
};

struct lb4_affinity_val {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_SERVICES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
} lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb4_backend);
} lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_REVNAT_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
} lb4_reverse_nat SEC(".maps");

/* One array per maglev service, of the configured table size (BPF_F_INNER_MAP: inner maps
 * may differ in max_entries, so a changed table size needs no new outer map). */
struct lb4_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, 0x1000 /* BPF_F_INNER_MAP */);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, LB_MAGLEV_SERVICES_MAX);
	__type(key, __u32);
	__array(values, struct lb4_maglev_inner);
} lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_AFFINITY_MAX);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity_val);
} lb4_affinity SEC(".maps");

/* Socket LB (bpf_sock.c): what a socket's backend stands for, so getpeername() and
 * recvmsg() show the service address (Cilium's lb4_reverse_sk). */
struct lb4_sock_key {
	__u64 cookie;       /* bpf_get_socket_cookie() */
	__be32 address;     /* backend */
	__be16 port;
	__u16 pad;
};

struct lb4_sock_val {
	__be32 address;     /* service VIP */
	__be16 port;
	__u16 rev_nat_index;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_AFFINITY_MAX);
	__type(key, struct lb4_sock_key);
	__type(value, struct lb4_sock_val);
} lb4_sock_revnat SEC(".maps");

/* The flow hash Maglev indexes with: a function of the 5-tuple only (not the kernel's
 * per-boot skb hash), so every node sends one flow to the same backend. */
static __always_inline __u32 lb4_hash(const struct pkt *p)
{
	__u32 h = 0x9747b28c;
	__u32 words[3] = { p->saddr, p->daddr,
			   ((__u32)p->sport << 16) ^ (__u32)p->dport ^ ((__u32)p->protocol << 8) };
	int i;

#pragma unroll
	for (i = 0; i < 3; i++) {
		__u32 k = words[i] * 0xcc9e2d51;

		k = (k << 15) | (k >> 17);
		h ^= k * 0x1b873593;
		h = ((h << 13) | (h >> 19)) * 5 + 0xe6546b64;
	}
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline struct lb4_service *lb4_lookup_service(const struct pkt *p)
{
	struct lb4_key key = { .address = p->daddr, .dport = p->dport, .proto = p->protocol };

	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return NULL;
	return bpf_map_lookup_elem(&lb4_services, &key);
}

static __always_inline struct lb4_backend *lb4_usable_backend(__u32 backend_id, int new_flow)
{
	struct lb4_backend *be;

	if (!backend_id)
		return NULL;
	be = bpf_map_lookup_elem(&lb4_backends, &backend_id);
	/* terminating/quarantined backends finish their flows but take no new ones */
	if (be && new_flow && be->flags != BE_ACTIVE)
		return NULL;
	return be;
}

/* Pick a backend id for a new flow (0: none usable). */
static __always_inline __u32 lb4_select(const struct pkt *p, const struct lb4_service *svc)
{
	struct lb4_key key = { .address = p->daddr, .dport = p->dport, .proto = p->protocol };
	struct lb4_service *slot;
	__u32 rev = svc->rev_nat_index;
	__u32 idx, *id;
	void *lut;

	if (!svc->count)
		return 0;
	if (svc->algorithm == LB_ALG_MAGLEV && svc->lut_size) {
		lut = bpf_map_lookup_elem(&lb4_maglev, &rev);
		if (!lut)
			return 0;
		idx = lb4_hash(p) % svc->lut_size;
		id = bpf_map_lookup_elem(lut, &idx);
		return id ? *id : 0;
	}
	key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&lb4_services, &key);
	return slot ? slot->backend_id : 0;
}

static __always_inline __u32 lb4_affinity_backend(const struct pkt *p,
						  const struct lb4_service *svc, __u64 now)
{
	struct lb4_affinity_key key = { .client_ip = p->saddr,
					.rev_nat_index = svc->rev_nat_index };
	struct lb4_affinity_val *val = bpf_map_lookup_elem(&lb4_affinity, &key);

	if (!val || now - val->last_used_ns > (__u64)svc->backend_id * NSEC_PER_SEC)
		return 0;
	return val->backend_id;
}

static __always_inline void lb4_affinity_update(const struct pkt *p,
						const struct lb4_service *svc, __u32 backend_id,
						__u64 now)
{
	struct lb4_affinity_key key = { .client_ip = p->saddr,
					.rev_nat_index = svc->rev_nat_index };
	struct lb4_affinity_val val = { .last_used_ns = now, .backend_id = backend_id };

	bpf_map_update_elem(&lb4_affinity, &key, &val, BPF_ANY);
}

/* The backend of the flow `p` (to the service `svc`): the one its service-scope conntrack
 * entry remembers while that backend still exists, else a new pick (affinity, Maglev or
 * random) that is remembered (unless dry_run). NULL: no usable backend. */
static __always_inline struct lb4_backend *lb4_pick_backend(const struct pkt *p,
							    const struct lb4_service *svc,
							    __u32 src_identity, __u16 ep_id,
							    int dry_run)
{
	struct lb4_backend *be = NULL;
	struct ct_entry *ct;
	struct ct_key key;
	__u32 backend_id = 0;
	__u64 now = bpf_ktime_get_ns();
	/* a SYN opens a new connection: it takes active backends only, and on the tuple of
	 * a flow that closed (the port reused) it picks afresh (Cilium's lb4_local alike) */
	int syn = p->protocol == IPPROTO_TCP &&
		  (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;

	ct_key_forward(&key, p, CT_DIR_SERVICE);
	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (ct && ct->expires_ns > now && !(syn && (ct->flags & CT_F_CLOSING))) {
		be = lb4_usable_backend(ct->backend_id, syn);
		if (be) {
			/* replies never pass here: a TCP packet acknowledging something is the
			 * sign the backend answered (else an established flow kept the SYN
			 * lifetime and, idle for a minute, was sent to another backend) */
			if (!dry_run)
				ct_refresh(ct, p, now, p->protocol == IPPROTO_TCP &&
					   (p->tcp_flags & TCP_FLAG_ACK));
			return be;
		}
	}
	if (svc->flags & SVC_F_AFFINITY) {
		backend_id = lb4_affinity_backend(p, svc, now);
		be = lb4_usable_backend(backend_id, 1);
	}
	if (!be) {
		backend_id = lb4_select(p, svc);
		be = lb4_usable_backend(backend_id, 1);
	}
	if (!be)
		return NULL;
	if (!dry_run) {
		struct ct_entry entry = {
			.src_identity = src_identity,
			.ep_id = ep_id,
			.rev_nat_index = svc->rev_nat_index,
			.backend_id = backend_id,
		};

		ct_refresh(&entry, p, now, 0);
		bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
		if (svc->flags & SVC_F_AFFINITY)
			lb4_affinity_update(p, svc, backend_id, now);
	}
	return be;
}

/* A NodePort flow to a local backend (post-DNAT tuple client -> backend): the backend's
 * reply is rewritten back to the node's address and NodePort (bpf_lxc's
 * lb4_nodeport_reply). */
static __always_inline void lb4_nodeport_remember(const struct pkt *p, __u16 rev_nat,
						  __u32 src_identity, __u16 ep_id)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *ct;
	struct ct_key key;

	ct_key_forward(&key, p, CT_DIR_NODEPORT);
	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (ct && ct->rev_nat_index == rev_nat) {
		ct_refresh(ct, p, now, 0);
	} else {
		struct ct_entry entry = {
			.src_identity = src_identity,
			.ep_id = ep_id,
			.rev_nat_index = rev_nat,
		};

		ct_refresh(&entry, p, now, 0);
		bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
	}
}

/* Offsets of the IPv4 and L4 checksums (Ethernet framing; options honoured). */
#define LB_IP_OFF 14
#define LB_IP_CSUM_OFF (LB_IP_OFF + 10)
#define LB_IP_SADDR_OFF (LB_IP_OFF + 12)
#define LB_IP_DADDR_OFF (LB_IP_OFF + 16)

static __always_inline int lb4_l4_off(struct __sk_buff *skb, __u32 *off)
{
	__u8 vihl;

	if (bpf_skb_load_bytes(skb, LB_IP_OFF, &vihl, 1) < 0)
		return -1;
	*off = LB_IP_OFF + (vihl & 0x0F) * 4;
	return 0;
}

/* Rewrite one address (source or destination) and its port, fixing both checksums. */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, __u8 proto, int dst,
				       __be32 old_addr, __be32 new_addr,
				       __be16 old_port, __be16 new_port)
{
	__u32 l4_off, csum_off, port_off;
	__u64 pseudo = BPF_F_PSEUDO_HDR;

	if (lb4_l4_off(skb, &l4_off) < 0)
		return -1;
	csum_off = l4_off + (proto == IPPROTO_TCP ? 16 : 6);
	port_off = l4_off + (dst ? 2 : 0);
	if (proto == IPPROTO_UDP)
		pseudo |= BPF_F_MARK_MANGLED_0;
	if (old_addr != new_addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, pseudo | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, LB_IP_CSUM_OFF, old_addr, new_addr, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, dst ? LB_IP_DADDR_OFF : LB_IP_SADDR_OFF, &new_addr,
					4, 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					(proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -1;
	}
	return 0;
}

#endif
