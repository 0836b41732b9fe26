/* Datapath events to user space through one ring buffer. The record layout is a contract
 * with pylium.datapath.maps.events.Event (64 bytes, offsets in the comments). */
#ifndef PYLIUM_EVENTS_H
#define PYLIUM_EVENTS_H

#include "common.h"

#define EVENT_DROP 1
#define EVENT_TRACE 2
#define EVENT_POLICY_VERDICT 3

/* TRACE observation points (Cilium's numbering) */
#define TRACE_TO_LXC 0
#define TRACE_TO_PROXY 1
#define TRACE_TO_STACK 3
#define TRACE_FROM_LXC 5
#define TRACE_TO_CRYPTO 12 /* into the encryption device */
/* a new flow to a service, translated to its backend (Hubble verdict TRANSLATED): emitted
 * beside the flow's own trace, with the backend as destination and the service's rev-NAT
 * index, so the flow shows the service name and where it went */
#define TRACE_LB_XLATE 14

#define EVENT_F_REPLY 0x01
#define EVENT_F_CT_NEW 0x02
#define EVENT_F_ENCRYPTED 0x04 /* the packet leaves the node encrypted (Hubble IP.encrypted) */

struct pylium_event {
	__u64 ts_ns;          /* 0 */
	__u8 type;            /* 8 */
	__u8 reason;          /* 9: drop reason | trace point | verdict */
	__u8 direction;       /* 10 */
	__u8 flags;           /* 11 */
	__u16 ep_id;          /* 12 */
	__u16 proxy_port;     /* 14 */
	__u32 src_identity;   /* 16 */
	__u32 dst_identity;   /* 20 */
	__be32 saddr;         /* 24 */
	__be32 daddr;         /* 28 */
	__be16 sport;         /* 32 */
	__be16 dport;         /* 34: ICMP type << 8 | code */
	__u8 protocol;        /* 36 */
	__u8 tcp_flags;       /* 37 */
	__u16 pad;            /* 38 */
	__u32 ifindex;        /* 40 */
	__u32 pkt_len;        /* 44 */
	__u16 rev_nat;        /* 48: service flow: rev-NAT index of its service (0: none) */
	__u16 pad2;           /* 50 */
	__u32 pad3;           /* 52 */
	__u64 pad4;           /* 56 */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} events_lost SEC(".maps");

/* Who the event is about: filled once per program run. */
struct event_ctx {
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 ep_id;
	__u8 direction;
	__u8 dry_run;
};

static __always_inline void emit_event(const struct event_ctx *ec, const struct pkt *p,
				       __u8 type, __u8 reason, __u8 flags, __u16 proxy_port)
{
	struct pylium_event *e;

	if (ec->dry_run)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&events_lost, &zero);

		if (lost)
			*lost += 1;
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->reason = reason;
	e->direction = ec->direction;
	e->flags = flags;
	e->ep_id = ec->ep_id;
	e->proxy_port = proxy_port;
	e->src_identity = ec->src_identity;
	e->dst_identity = ec->dst_identity;
	e->saddr = p->saddr;
	e->daddr = p->daddr;
	e->sport = p->protocol == IPPROTO_ICMP ? 0 : p->sport;
	e->dport = p->event_dport;
	e->protocol = p->protocol;
	e->tcp_flags = p->tcp_flags;
	e->pad = 0;
	e->ifindex = ec->ifindex;
	e->pkt_len = p->len;
	e->rev_nat = p->rev_nat;
	e->pad2 = 0;
	e->pad3 = 0;
	e->pad4 = 0;
	bpf_ringbuf_submit(e, 0);
}

#endif
