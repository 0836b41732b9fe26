// SPDX-License-Identifier: Apache-2.0
/* Endpoint (container) programs, attached to the host side of each endpoint's veth in the
 * node netns:
 *   from_container  tc ingress: packets leaving the pod (egress policy of the pod)
 *   to_container    tc egress:  packets entering the pod (ingress policy of the pod)
 * One instance of each serves every endpoint: the endpoint is found by its address in the
 * endpoints map and must sit behind the interface the packet is on (skb->ifindex). */

#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/routing.h"
#include "lib/proxy.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "GPL";

/* from_container -> to_container_peer (local delivery without a second tc run and backlog
 * queue); the Datapath fills the slot after loading and pins the array. */
#define LXC_SLOT_TO_PEER 0
#define CB_PEER_IFINDEX CB_RESULT_TARGET /* the destination veth, for to_container_peer */

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} lxc_progs SEC(".maps");

struct result {
	__u32 reason;
	__u32 verdict;
	__u32 identity;
	__u32 ct;
	__u32 target;
	__u16 proxy_port; /* != 0: send the packet to the L7 proxy on this port */
	__u16 rev_nat;   /* service flow: its rev-NAT index (new flows: set by lb4_translate) */
	__u8 ct_flags;   /* CT_F_* of the entry a reply matched */
	__u8 pad;
};

static __always_inline void write_result(struct __sk_buff *skb, const struct result *r)
{
	ctx_opaque(skb);
	skb->cb[CB_RESULT_REASON] = r->reason;
	skb->cb[CB_RESULT_VERDICT] = r->verdict;
	skb->cb[CB_RESULT_IDENTITY] = r->identity;
	skb->cb[CB_RESULT_CT] = r->ct;
	skb->cb[CB_RESULT_TARGET] = r->target;
}

static __always_inline int drop_packet(struct __sk_buff *skb, const struct event_ctx *ec,
				       const struct pkt *p, struct result *r, __u8 reason)
{
	r->reason = reason;
	write_result(skb, r);
	if (!ec->dry_run) {
		metrics_count(reason, ec->direction, p->len);
		emit_event(ec, p, EVENT_DROP, reason, r->ct == CT_REPLY ? EVENT_F_REPLY : 0, 0);
	}
	return TC_ACT_SHOT;
}

static __always_inline void count_forward(const struct event_ctx *ec, const struct pkt *p)
{
	if (!ec->dry_run)
		metrics_count(REASON_FORWARDED, ec->direction, p->len);
}

/* Conntrack, then (for new flows, or flows whose endpoint policy changed) the endpoint's
 * policy about `peer_identity`. Returns 0 to pass, else a drop reason; r->proxy_port says
 * the flow goes to the L7 proxy (a redirect entry, remembered in conntrack so the flow's
 * later packets follow). `proxied`: the packet comes from this node's L7 proxy, which
 * already judged the L7 rules for `peer_identity`: a redirect entry lets it through. */
static __always_inline __u8 enforce(const struct event_ctx *ec, const struct pkt *p,
				    __u32 peer_identity, struct result *r, int proxied)
{
	struct policy_verdict v;
	struct policy_entry *meta;
	struct ct_entry *ct;
	struct ct_key key;
	__u32 ep = ec->ep_id;
	__u64 now = bpf_ktime_get_ns();
	void *inner;

	r->identity = peer_identity;
	inner = bpf_map_lookup_elem(&policy, &ep);
	if (!inner)
		return DROP_NO_CONFIG;
	meta = policy_meta(inner);
	if (!meta)
		return DROP_NO_CONFIG;

	ct_key_forward(&key, p, ec->direction);
	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (ct && ct->expires_ns > now) {
		r->ct = CT_ESTABLISHED;
		/* a reused tuple: the flow now goes (or no longer goes) through a service */
		if (ec->direction == DIR_EGRESS && !ec->dry_run &&
		    (ct->rev_nat_index != r->rev_nat ||
		     (ct->flags & CT_F_LOOPBACK) != r->ct_flags)) {
			ct->rev_nat_index = r->rev_nat;
			ct->flags = (ct->flags & ~CT_F_LOOPBACK) | r->ct_flags;
		}
		if (ct->policy_rev == meta->revision) {
			r->proxy_port = ct->proxy_port;
			if (!ec->dry_run)
				ct_refresh(ct, p, now, 0);
			return 0;
		}
		/* the endpoint's policy changed since this flow was allowed: ask again */
		v = policy_decide(inner, meta, peer_identity, ec->direction, p->protocol,
				  p->policy_port);
		if (proxied)
			v.proxy_port = 0;
		r->proxy_port = v.proxy_port;
		r->verdict = v.verdict | ((__u32)v.proxy_port << 16);
		emit_event(ec, p, EVENT_POLICY_VERDICT, v.verdict, 0, v.proxy_port);
		if (v.verdict == VERDICT_DENY) {
			if (!ec->dry_run)
				bpf_map_delete_elem(&conntrack, &key);
			return v.deny_entry ? DROP_POLICY_DENY : DROP_POLICY;
		}
		if (!ec->dry_run) {
			ct->policy_rev = meta->revision;
			ct->proxy_port = v.proxy_port;
			ct_refresh(ct, p, now, 0);
		}
		return 0;
	}

	ct_key_reverse(&key, p, ec->direction);
	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (ct && ct->expires_ns > now) {
		r->ct = CT_REPLY;
		r->rev_nat = ct->rev_nat_index;
		r->ct_flags = ct->flags;
		if (!ec->dry_run)
			ct_refresh(ct, p, now, 1);
		return 0;
	}

	r->ct = CT_NEW;
	v = policy_decide(inner, meta, peer_identity, ec->direction, p->protocol, p->policy_port);
	if (proxied)
		v.proxy_port = 0;
	r->proxy_port = v.proxy_port;
	r->verdict = v.verdict | ((__u32)v.proxy_port << 16);
	emit_event(ec, p, EVENT_POLICY_VERDICT, v.verdict, EVENT_F_CT_NEW, v.proxy_port);
	if (v.verdict == VERDICT_DENY)
		return v.deny_entry ? DROP_POLICY_DENY : DROP_POLICY;
	if (!ec->dry_run) {
		struct ct_entry entry = {
			.src_identity = ec->src_identity,
			.policy_rev = meta->revision,
			.ep_id = ec->ep_id,
			.proxy_port = v.proxy_port,
			.rev_nat_index = r->rev_nat,
			.flags = r->ct_flags,
		};

		ct_key_forward(&key, p, ec->direction);
		entry.expires_ns = now;
		ct_refresh(&entry, p, now, 0);
		bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
	}
	return 0;
}

/* Service translation (lib/lb.h): a new flow to a VIP gets a backend (affinity, Maglev or
 * random) remembered in a service-scope conntrack entry; every packet of the flow is then
 * DNATed to it before the policy lookup, which sees the backend. Returns 0 or a drop
 * reason. Sets r->rev_nat (and CT_F_LOOPBACK for a hairpin) for the endpoint's CT entry. */
static __always_inline int lb4_translate(struct __sk_buff *skb, struct pkt *p,
					 const struct event_ctx *ec, struct result *r)
{
	struct lb4_service *svc = lb4_lookup_service(p);
	struct lb4_backend *be;
	__be32 new_saddr;

	if (!svc)
		return 0;
	be = lb4_pick_backend(p, svc, ec->src_identity, ec->ep_id, ec->dry_run);
	if (!be)
		return DROP_NO_SERVICE;
	/* hairpin: the pod is its own backend; it would drop a packet from itself */
	new_saddr = be->address == p->saddr ? LB_LOOPBACK_IP : p->saddr;
	if (lb4_rewrite(skb, p->protocol, 1, p->daddr, be->address, p->dport, be->port) < 0)
		return DROP_WRITE_ERROR;
	if (new_saddr != p->saddr &&
	    lb4_rewrite(skb, p->protocol, 0, p->saddr, new_saddr, p->sport, p->sport) < 0)
		return DROP_WRITE_ERROR;
	if (new_saddr != p->saddr)
		r->ct_flags = CT_F_LOOPBACK;
	p->saddr = new_saddr;
	p->daddr = be->address;
	p->dport = be->port;
	p->policy_port = be->port;
	p->event_dport = be->port;
	p->rev_nat = svc->rev_nat_index;
	r->rev_nat = svc->rev_nat_index;
	return 0;
}

/* The flow goes to the L7 proxy (lib/proxy.h): assign it to the proxy socket and pass it up
 * the node's stack. Only at tc ingress (from_container). */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct event_ctx *ec,
				    const struct pkt *p, struct result *r)
{
	__u8 reason = proxy_assign(skb, p, r->proxy_port, ec->dry_run);

	if (reason)
		return drop_packet(skb, ec, p, r, reason);
	count_forward(ec, p);
	r->target = TARGET_PROXY;
	write_result(skb, r);
	if (r->ct == CT_NEW)
		emit_event(ec, p, EVENT_TRACE, TRACE_TO_PROXY, EVENT_F_CT_NEW, r->proxy_port);
	return TC_ACT_OK;
}

/* Reverse NAT of a reply to a service flow (found as CT_REPLY in to_container): the
 * backend's address and port become the VIP's again; a hairpinned reply also goes back
 * to the pod's own address. Returns 0 or a drop reason. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt *p,
				       const struct result *r)
{
	struct lb4_reverse_nat *nat;
	__u16 index = r->rev_nat;

	nat = bpf_map_lookup_elem(&lb4_reverse_nat, &index);
	if (!nat)
		return 0; /* the service is gone: nothing to rewrite to */
	if (lb4_rewrite(skb, p->protocol, 0, p->saddr, nat->address, p->sport, nat->port) < 0)
		return DROP_WRITE_ERROR;
	if ((r->ct_flags & CT_F_LOOPBACK) && p->daddr == LB_LOOPBACK_IP) {
		if (lb4_rewrite(skb, p->protocol, 1, p->daddr, p->saddr, p->dport, p->dport) < 0)
			return DROP_WRITE_ERROR;
		p->daddr = p->saddr;
	}
	p->saddr = nat->address;
	p->sport = nat->port;
	p->rev_nat = index;
	return 0;
}

#ifndef AF_INET
#define AF_INET 2
#endif

/* A TCP SYN to a service with no usable backend is answered with a RST (Cilium's
 * "Service backend not found" rejects rather than blackholes): the SYN is turned around in
 * place (addresses, ports and MACs swapped; seq 0, ack = seq + 1, RST|ACK; the checksum
 * sum is unchanged by the swaps) and handed straight back into the pod. Counted as a drop
 * with reason DROP_NO_SERVICE. */
static __always_inline int lb4_reject_tcp(struct __sk_buff *skb, const struct event_ctx *ec,
					  const struct pkt *p, struct result *r)
{
	__u8 macs[12], swapped[12];
	__be32 seq, ack, old_ack, zero = 0;
	__be16 old_word, new_word;
	__u32 l4_off, csum_off;
	int i;

	r->reason = DROP_NO_SERVICE;
	write_result(skb, r);
	metrics_count(DROP_NO_SERVICE, ec->direction, p->len);
	emit_event(ec, p, EVENT_DROP, DROP_NO_SERVICE, 0, 0);
	if (lb4_l4_off(skb, &l4_off) < 0 || bpf_skb_load_bytes(skb, 0, macs, 12) < 0 ||
	    bpf_skb_load_bytes(skb, l4_off + 4, &seq, 4) < 0 ||
	    bpf_skb_load_bytes(skb, l4_off + 8, &old_ack, 4) < 0 ||
	    bpf_skb_load_bytes(skb, l4_off + 12, &old_word, 2) < 0)
		return TC_ACT_SHOT;
	csum_off = l4_off + 16;
#pragma unroll
	for (i = 0; i < 6; i++) {
		swapped[i] = macs[i + 6];
		swapped[i + 6] = macs[i];
	}
	ack = bpf_htonl(bpf_ntohl(seq) + 1);
	new_word = (old_word & bpf_htons(0xFF00)) | bpf_htons(TCP_FLAG_RST | TCP_FLAG_ACK);
	if (bpf_skb_store_bytes(skb, 0, swapped, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, LB_IP_SADDR_OFF, &p->daddr, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, LB_IP_DADDR_OFF, &p->saddr, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4_off, &p->dport, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4_off + 2, &p->sport, 2, 0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, seq, zero, 4) < 0 ||
	    bpf_skb_store_bytes(skb, l4_off + 4, &zero, 4, 0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_ack, ack, 4) < 0 ||
	    bpf_skb_store_bytes(skb, l4_off + 8, &ack, 4, 0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_word, new_word, 2) < 0 ||
	    bpf_skb_store_bytes(skb, l4_off + 12, &new_word, 2, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

static __always_inline __u16 csum_fold32(__s64 csum)
{
	__u64 c = (__u64)csum;

	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return ~c;
}

/* UDP to a service with no usable backend: an ICMP port unreachable goes straight back
 * into the pod (its connected socket sees ECONNREFUSED). The datagram becomes the error in
 * place: 28 bytes (a new IPv4 header and the ICMP header) are inserted before its IPv4
 * header and the rest is cut after that header + 8 bytes, the quote RFC 792 asks for.
 * Counted as a drop with reason DROP_NO_SERVICE. */
static __always_inline int lb4_reject_udp(struct __sk_buff *skb, const struct event_ctx *ec,
					  const struct pkt *p, struct result *r)
{
	struct {
		struct iphdr ip;
		__u8 icmp[8];
	} hdr = {};
	__u8 macs[12], swapped[12], quote[28];
	__s64 csum;
	int i;

	r->reason = DROP_NO_SERVICE;
	write_result(skb, r);
	metrics_count(DROP_NO_SERVICE, ec->direction, p->len);
	emit_event(ec, p, EVENT_DROP, DROP_NO_SERVICE, 0, 0);
	if (bpf_skb_load_bytes(skb, 0, macs, 12) < 0 ||
	    bpf_skb_load_bytes(skb, LB_IP_OFF, quote, 28) < 0 || (quote[0] & 0x0F) != 5)
		return TC_ACT_SHOT; /* IP options: just drop */
#pragma unroll
	for (i = 0; i < 6; i++) {
		swapped[i] = macs[i + 6];
		swapped[i + 6] = macs[i];
	}
	hdr.ip.version = 4;
	hdr.ip.ihl = 5;
	hdr.ip.tos = 0xc0;
	hdr.ip.tot_len = bpf_htons(20 + 8 + 28);
	hdr.ip.ttl = 64;
	hdr.ip.protocol = IPPROTO_ICMP;
	hdr.ip.saddr = p->daddr;
	hdr.ip.daddr = p->saddr;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&hdr.ip, 20, 0);
	if (csum < 0)
		return TC_ACT_SHOT;
	hdr.ip.check = csum_fold32(csum);
	hdr.icmp[0] = 3; /* destination unreachable */
	hdr.icmp[1] = 3; /* port unreachable */
	csum = bpf_csum_diff(NULL, 0, (__be32 *)hdr.icmp, 8, 0);
	if (csum < 0)
		return TC_ACT_SHOT;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)quote, 28, csum);
	if (csum < 0)
		return TC_ACT_SHOT;
	*(__u16 *)&hdr.icmp[2] = csum_fold32(csum);
	if (bpf_skb_adjust_room(skb, sizeof(hdr), BPF_ADJ_ROOM_MAC, 0) < 0 ||
	    bpf_skb_change_tail(skb, LB_IP_OFF + sizeof(hdr) + sizeof(quote), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, swapped, 12, 0) < 0 ||
	    bpf_skb_store_bytes(skb, LB_IP_OFF, &hdr, sizeof(hdr), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/* A reply from a local NodePort backend (a CT_DIR_NODEPORT entry names its flow): back to
 * the node's address and NodePort, then straight out of the interface the kernel's FIB
 * names (the stack would drop a packet from the node's own address arriving on a veth).
 * Returns -1 when the packet is not such a reply, else a tc action or -2 on error. */
static __always_inline int lb4_nodeport_reply(struct __sk_buff *skb, struct pkt *p,
					      const struct event_ctx *ec, struct result *r)
{
	struct ct_key key = { .saddr = p->daddr, .daddr = p->saddr, .sport = p->dport,
			      .dport = p->sport, .protocol = p->protocol,
			      .direction = CT_DIR_NODEPORT };
	struct bpf_fib_lookup fib = {};
	struct ct_entry *ct;
	long rc;

	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (!ct || !ct->rev_nat_index || ct->expires_ns <= bpf_ktime_get_ns())
		return -1;
	r->rev_nat = ct->rev_nat_index;
	if (lb4_rev_nat(skb, p, r))
		return -2;
	if (ec->dry_run)
		return TC_ACT_REDIRECT;
	fib.family = AF_INET;
	fib.l4_protocol = p->protocol;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return -2;
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
		return -2;
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline int redirect_to_endpoint(struct __sk_buff *skb,
						const struct endpoint_info *dst,
						__u32 src_identity)
{
	if (bpf_skb_store_bytes(skb, 0, dst->mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, dst->host_mac, 6, 0) < 0)
		return -1;
	skb->mark = mark_encode_identity(src_identity);
	return bpf_redirect(dst->ifindex, 0);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	struct event_ctx ec = { .ifindex = skb->ifindex, .direction = DIR_EGRESS };
	struct result r = {};
	struct pkt p = {};
	struct endpoint_info *src, *dst;
	struct remote_endpoint_info *remote = NULL;
	int ret;
	__u8 reason;

	ec.dry_run = is_dry_run(skb);
	ret = parse_packet(skb, &p);
	if (ret == PARSE_PASS)
		return TC_ACT_OK;
	if (ret != PARSE_OK)
		return drop_packet(skb, &ec, &p, &r, ret);

	if (is_to_proxy_mark(skb->mark) && !ec.dry_run) {
		/* hairpinned by to_container of this veth: the ingress policy of the endpoint
		 * behind it redirected the flow to the proxy (port in the mark) */
		ec.direction = DIR_INGRESS;
		dst = lookup_endpoint(p.daddr);
		if (!dst || dst->ifindex != skb->ifindex)
			return drop_packet(skb, &ec, &p, &r, DROP_NO_LOCAL_ENDPOINT);
		ec.ep_id = dst->ep_id;
		ec.dst_identity = dst->identity;
		/* to_container counted the packet and emitted the flow's events */
		reason = proxy_assign(skb, &p, skb->mark >> 16, 0);
		if (reason)
			return drop_packet(skb, &ec, &p, &r, reason);
		return TC_ACT_OK;
	}

	src = lookup_endpoint(p.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return drop_packet(skb, &ec, &p, &r, DROP_INVALID_SIP);
	ec.ep_id = src->ep_id;
	ec.src_identity = src->identity;

	reason = lb4_translate(skb, &p, &ec, &r);
	if (reason == DROP_NO_SERVICE && !ec.dry_run && p.protocol == IPPROTO_TCP &&
	    (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return lb4_reject_tcp(skb, &ec, &p, &r);
	if (reason == DROP_NO_SERVICE && !ec.dry_run && p.protocol == IPPROTO_UDP)
		return lb4_reject_udp(skb, &ec, &p, &r);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);

	/* a hairpinned reply (to LB_LOOPBACK_IP) goes back to the pod that sent it */
	dst = lookup_endpoint(p.daddr == LB_LOOPBACK_IP ? p.saddr : p.daddr);
	if (dst) {
		ec.dst_identity = dst->identity;
	} else {
		remote = ipcache_lookup(p.daddr);
		ec.dst_identity = remote ? remote->identity : IDENTITY_WORLD;
	}

	reason = enforce(&ec, &p, ec.dst_identity, &r, 0);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);
	if (r.ct == CT_NEW && r.rev_nat)
		emit_event(&ec, &p, EVENT_TRACE, TRACE_LB_XLATE, EVENT_F_CT_NEW, 0);
	if (r.proxy_port)
		return to_proxy(skb, &ec, &p, &r);
	count_forward(&ec, &p);

	if (dst) {
		r.target = dst->ifindex;
		write_result(skb, &r);
		if (r.ct == CT_NEW)
			emit_event(&ec, &p, EVENT_TRACE, TRACE_FROM_LXC, EVENT_F_CT_NEW, 0);
		if (ec.dry_run)
			return TC_ACT_REDIRECT;
		ret = redirect_to_endpoint(skb, dst, ec.src_identity);
		if (ret < 0)
			return drop_packet(skb, &ec, &p, &r, DROP_WRITE_ERROR);
		if (dst->ifindex != skb->ifindex && skb->ingress_ifindex == skb->ifindex) {
			/* the destination's side right here, then into its pod (an empty slot,
			 * e.g. while an agent restarts, falls back to the veth's to_container).
			 * Only for a packet received on this veth: bpf_redirect_peer() is for tc
			 * ingress (a BPF_PROG_TEST_RUN of this program alone stays alone). */
			ctx_opaque(skb);
			skb->cb[CB_PEER_IFINDEX] = dst->ifindex;
			bpf_tail_call(skb, &lxc_progs, LXC_SLOT_TO_PEER);
			write_result(skb, &r);
		}
		return ret;
	}
	if (r.ct == CT_REPLY && !r.rev_nat) {
		ret = lb4_nodeport_reply(skb, &p, &ec, &r);
		if (ret == -2)
			return drop_packet(skb, &ec, &p, &r, DROP_WRITE_ERROR);
		if (ret >= 0) {
			write_result(skb, &r);
			return ret;
		}
	}
	/* Remote destination: the encryption plugin's program (if its slot is filled) sends
	 * it into the encryption device, or hands it on to the routing slot itself; behind a
	 * tunnel endpoint, the routing plugin's program (if its slot is filled) encapsulates;
	 * otherwise the node's stack routes the packet. */
	write_result(skb, &r);
	if (r.ct == CT_NEW)
		emit_event(&ec, &p, EVENT_TRACE, TRACE_TO_STACK, EVENT_F_CT_NEW, 0);
	if (!ec.dry_run) {
		__u32 tunnel = remote ? remote->tunnel_endpoint : 0;

		ctx_opaque(skb); /* each cb store addressed from skb itself (lib/common.h) */
		skb->cb[CB_ROUTING_IDENTITY] = ec.src_identity;
		skb->cb[CB_ROUTING_TUNNEL] = tunnel;
		bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_ENCRYPT);
		if (remote && remote->tunnel_endpoint)
			bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_REMOTE);
		write_result(skb, &r); /* empty slots: restore the result slots */
	}
	return TC_ACT_OK;
}

/* The destination endpoint's side: its ingress policy, conntrack and the reverse NAT of a
 * service reply. `peer` 0: to_container, at tc egress of the endpoint's veth (the packet
 * then enters the pod). `peer` 1: tail-called by from_container for a packet from another
 * local endpoint (LXC_SLOT_TO_PEER): the packet is still on the sender's veth; the same
 * checks run here and bpf_redirect_peer() hands it straight to the pod's side of the
 * destination veth, which skips that veth's egress and one backlog queue (Cilium's
 * local delivery does the same). */
static __always_inline int handle_to_container(struct __sk_buff *skb, const int peer)
{
	struct event_ctx ec = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	struct result r = {};
	struct pkt p = {};
	struct endpoint_info *dst;
	__u32 mark = skb->mark;
	__u32 magic = mark & MARK_MAGIC_MASK;
	int proxied = 0;
	int ret;
	__u8 reason;

	ec.dry_run = is_dry_run(skb);
	ret = parse_packet(skb, &p);
	if (ret == PARSE_PASS)
		return TC_ACT_OK;
	if (ret != PARSE_OK)
		return drop_packet(skb, &ec, &p, &r, ret);

	dst = lookup_endpoint(p.daddr == LB_LOOPBACK_IP ? p.saddr : p.daddr);
	if (!dst || (!peer && dst->ifindex != skb->ifindex) ||
	    (peer && dst->ifindex != skb->cb[CB_PEER_IFINDEX]))
		return drop_packet(skb, &ec, &p, &r, DROP_NO_LOCAL_ENDPOINT);
	if (peer)
		ec.ifindex = dst->ifindex;
	ec.ep_id = dst->ep_id;
	ec.dst_identity = dst->identity;

	if (magic == MARK_MAGIC_IDENTITY || magic == MARK_MAGIC_PROXY_EGRESS) {
		ec.src_identity = mark_decode_identity(mark);
		/* sent by a socket of this node (not received on any interface, as packets
		 * from_container redirects are): the L7 proxy's upstream for that identity */
		proxied = magic == MARK_MAGIC_IDENTITY && skb->ingress_ifindex == 0;
		skb->mark = 0;
	} else if (ec.dry_run && skb->cb[1] == TRACE_CB_IDENTITY) {
		ec.src_identity = skb->cb[0];
	} else {
		ec.src_identity = resolve_identity(p.saddr);
	}

	reason = enforce(&ec, &p, ec.src_identity, &r, proxied);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);
	if (r.proxy_port) {
		/* tc egress cannot assign a socket: hairpin into this veth's ingress, where
		 * from_container hands the packet to the proxy. The destination MAC becomes the
		 * veth's own, so the stack takes the packet as addressed to this host. */
		reason = proxy_supports(&p);
		if (reason)
			return drop_packet(skb, &ec, &p, &r, reason);
		count_forward(&ec, &p);
		r.target = TARGET_PROXY;
		write_result(skb, &r);
		if (r.ct == CT_NEW)
			emit_event(&ec, &p, EVENT_TRACE, TRACE_TO_PROXY, EVENT_F_CT_NEW, r.proxy_port);
		if (ec.dry_run)
			return TC_ACT_REDIRECT;
		if (bpf_skb_store_bytes(skb, 0, dst->host_mac, 6, 0) < 0)
			return drop_packet(skb, &ec, &p, &r, DROP_WRITE_ERROR);
		skb->mark = mark_encode_to_proxy(r.proxy_port);
		return bpf_redirect(dst->ifindex, BPF_F_INGRESS);
	}
	if (r.ct == CT_REPLY && r.rev_nat) {
		reason = lb4_rev_nat(skb, &p, &r);
		if (reason)
			return drop_packet(skb, &ec, &p, &r, reason);
	}
	count_forward(&ec, &p);
	r.target = dst->ifindex;
	write_result(skb, &r);
	if (r.ct == CT_NEW)
		emit_event(&ec, &p, EVENT_TRACE, TRACE_TO_LXC, EVENT_F_CT_NEW, 0);
	return peer ? bpf_redirect_peer(dst->ifindex, 0) : TC_ACT_OK;
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	return handle_to_container(skb, 0);
}

SEC("tc")
int to_container_peer(struct __sk_buff *skb)
{
	return handle_to_container(skb, 1);
}

/* Send a packet the stack would refuse (its source is the node's own address) straight out
 * of the interface the FIB names for its destination. */
static __always_inline int fib_redirect(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.l4_protocol = p->protocol;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

/* NodePort, traffic policy Cluster, backend on another node: SNAT to the node's address
 * (the client's port kept) so the reply comes back here, remembered in a
 * CT_DIR_NODEPORT_SNAT entry; then to the backend's node through the routing mode
 * (tunnel slot) or the FIB. */
static __always_inline int nodeport_snat_forward(struct __sk_buff *skb, struct pkt *p,
						 struct event_ctx *ec, struct result *r,
						 __be32 node_addr)
{
	struct remote_endpoint_info *remote;
	struct ct_entry *ct;
	struct ct_key key;
	__u64 now;

	if (lb4_rewrite(skb, p->protocol, 0, p->saddr, node_addr, p->sport, p->sport) < 0)
		return drop_packet(skb, ec, p, r, DROP_WRITE_ERROR);
	key.saddr = node_addr;
	key.daddr = p->daddr;
	key.sport = p->sport;
	key.dport = p->dport;
	key.protocol = p->protocol;
	key.direction = CT_DIR_NODEPORT_SNAT;
	key.pad = 0;
	if (!ec->dry_run) {
		now = bpf_ktime_get_ns();
		ct = bpf_map_lookup_elem(&conntrack, &key);
		if (ct && ct->nat_addr == p->saddr) {
			ct_refresh(ct, p, now, 0);
		} else {
			struct ct_entry entry = {
				.src_identity = ec->src_identity,
				.rev_nat_index = r->rev_nat,
				.nat_addr = p->saddr,
			};

			ct_refresh(&entry, p, now, 0);
			bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
		}
	}
	p->saddr = node_addr;
	if (ec->dry_run)
		return TC_ACT_OK;
	metrics_count(REASON_FORWARDED, ec->direction, p->len);
	remote = ipcache_lookup(p->daddr);
	if (remote && remote->tunnel_endpoint) {
		ctx_opaque(skb);
		skb->cb[CB_ROUTING_IDENTITY] = ec->src_identity;
		skb->cb[CB_ROUTING_TUNNEL] = remote->tunnel_endpoint;
		bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_REMOTE);
	}
	return fib_redirect(skb, p);
}

/* The reply of a SNATed NodePort flow, back at the node: to the client again, from the
 * node's address and NodePort, out of the interface towards the client. Anything else
 * passes untouched. */
static __always_inline int nodeport_snat_reply(struct __sk_buff *skb, struct pkt *p,
					       struct event_ctx *ec, struct result *r)
{
	struct ct_key key = { .saddr = p->daddr, .daddr = p->saddr, .sport = p->dport,
			      .dport = p->sport, .protocol = p->protocol,
			      .direction = CT_DIR_NODEPORT_SNAT };
	struct ct_entry *ct;
	__be32 client;

	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	ct = bpf_map_lookup_elem(&conntrack, &key);
	if (!ct || ct->expires_ns <= bpf_ktime_get_ns())
		return TC_ACT_OK;
	client = ct->nat_addr;
	r->rev_nat = ct->rev_nat_index;
	if (!ec->dry_run)
		ct_refresh(ct, p, bpf_ktime_get_ns(), 1);
	if (lb4_rewrite(skb, p->protocol, 1, p->daddr, client, p->dport, p->dport) < 0)
		return TC_ACT_SHOT;
	p->daddr = client;
	if (lb4_rev_nat(skb, p, r))
		return TC_ACT_SHOT;
	if (ec->dry_run)
		return TC_ACT_OK;
	return fib_redirect(skb, p);
}

/* NodePort (lib/lb.h), tc ingress of the node's external interface: a packet to a NodePort
 * frontend (the node's address) is DNATed to a backend on this node and handed to its
 * endpoint (to_container enforces its ingress policy against the client's identity); the
 * client's source address is kept. Everything else passes untouched: this is the host's
 * interface, not ours to judge. */
SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	struct event_ctx ec = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	struct result r = {};
	struct pkt p = {};
	struct lb4_service *svc;
	struct endpoint_info *dst;
	__be32 node_addr;
	int ret;
	__u8 reason;

	ec.dry_run = is_dry_run(skb);
	if (parse_packet(skb, &p) != PARSE_OK)
		return TC_ACT_OK;
	svc = lb4_lookup_service(&p);
	if (!svc || !(svc->flags & SVC_F_NODEPORT))
		return nodeport_snat_reply(skb, &p, &ec, &r);
	ec.src_identity = resolve_identity(p.saddr);
	node_addr = p.daddr;
	reason = lb4_translate(skb, &p, &ec, &r);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);
	dst = lookup_endpoint(p.daddr);
	if (!dst) {
		if (svc->flags & SVC_F_LOCAL) /* Local: never another node's backend */
			return drop_packet(skb, &ec, &p, &r, DROP_NO_SERVICE);
		return nodeport_snat_forward(skb, &p, &ec, &r, node_addr);
	}
	ec.ep_id = dst->ep_id;
	ec.dst_identity = dst->identity;
	if (!ec.dry_run)
		lb4_nodeport_remember(&p, r.rev_nat, ec.src_identity, dst->ep_id);
	if (ec.dry_run)
		return TC_ACT_REDIRECT;
	ret = redirect_to_endpoint(skb, dst, ec.src_identity);
	if (ret < 0)
		return drop_packet(skb, &ec, &p, &r, DROP_WRITE_ERROR);
	return ret;
}
