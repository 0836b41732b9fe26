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

char LICENSE[] SEC("license") = "GPL";

struct result {
	__u32 reason;
	__u32 verdict;
	__u32 identity;
	__u32 ct;
	__u32 target;
};

static __always_inline void write_result(struct __sk_buff *skb, const struct result *r)
{
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
 * policy about `peer_identity`. Returns 0 to forward, else a drop reason. */
static __always_inline __u8 enforce(const struct event_ctx *ec, const struct pkt *p,
				    __u32 peer_identity, struct result *r)
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
		if (ct->policy_rev == meta->revision) {
			if (!ec->dry_run)
				ct_refresh(ct, p, now, 0);
			return 0;
		}
		/* the endpoint's policy changed since this flow was allowed: ask again */
		v = policy_decide(inner, meta, peer_identity, ec->direction, p->protocol,
				  p->policy_port);
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
		if (!ec->dry_run)
			ct_refresh(ct, p, now, 1);
		return 0;
	}

	r->ct = CT_NEW;
	v = policy_decide(inner, meta, peer_identity, ec->direction, p->protocol, p->policy_port);
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
		};

		ct_key_forward(&key, p, ec->direction);
		entry.expires_ns = now;
		ct_refresh(&entry, p, now, 0);
		bpf_map_update_elem(&conntrack, &key, &entry, BPF_ANY);
	}
	return 0;
}

/* Service translation slot (load balancing, later): rewrite the destination of `p` and the
 * packet to a backend before the policy lookup, which then sees the backend. */
static __always_inline int lb4_translate(struct __sk_buff *skb, struct pkt *p)
{
	return 0;
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

	src = lookup_endpoint(p.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return drop_packet(skb, &ec, &p, &r, DROP_INVALID_SIP);
	ec.ep_id = src->ep_id;
	ec.src_identity = src->identity;

	if (lb4_translate(skb, &p) < 0)
		return drop_packet(skb, &ec, &p, &r, DROP_WRITE_ERROR);

	dst = lookup_endpoint(p.daddr);
	if (dst) {
		ec.dst_identity = dst->identity;
	} else {
		remote = ipcache_lookup(p.daddr);
		ec.dst_identity = remote ? remote->identity : IDENTITY_WORLD;
	}

	reason = enforce(&ec, &p, ec.dst_identity, &r);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);
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
		return ret;
	}
	/* Remote destination: the encryption plugin's program (if its slot is filled) sends
	 * it into the encryption device, or hands it on to the routing slot itself; behind a
	 * tunnel endpoint, the routing plugin's program (if its slot is filled) encapsulates;
	 * otherwise the node's stack routes the packet. */
	write_result(skb, &r);
	if (r.ct == CT_NEW)
		emit_event(&ec, &p, EVENT_TRACE, TRACE_TO_STACK, EVENT_F_CT_NEW, 0);
	if (!ec.dry_run) {
		skb->cb[CB_ROUTING_IDENTITY] = ec.src_identity;
		skb->cb[CB_ROUTING_TUNNEL] = remote ? remote->tunnel_endpoint : 0;
		bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_ENCRYPT);
		if (remote && remote->tunnel_endpoint)
			bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_REMOTE);
		write_result(skb, &r); /* empty slots: restore the result slots */
	}
	return TC_ACT_OK;
}

SEC("tc")
int to_container(struct __sk_buff *skb)
{
	struct event_ctx ec = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	struct result r = {};
	struct pkt p = {};
	struct endpoint_info *dst;
	__u32 mark = skb->mark;
	__u32 magic = mark & MARK_MAGIC_MASK;
	int ret;
	__u8 reason;

	ec.dry_run = is_dry_run(skb);
	ret = parse_packet(skb, &p);
	if (ret == PARSE_PASS)
		return TC_ACT_OK;
	if (ret != PARSE_OK)
		return drop_packet(skb, &ec, &p, &r, ret);

	dst = lookup_endpoint(p.daddr);
	if (!dst || dst->ifindex != skb->ifindex)
		return drop_packet(skb, &ec, &p, &r, DROP_NO_LOCAL_ENDPOINT);
	ec.ep_id = dst->ep_id;
	ec.dst_identity = dst->identity;

	if (magic == MARK_MAGIC_IDENTITY) {
		ec.src_identity = mark_decode_identity(mark);
		skb->mark = 0;
	} else if (ec.dry_run && skb->cb[1] == TRACE_CB_IDENTITY) {
		ec.src_identity = skb->cb[0];
	} else {
		ec.src_identity = resolve_identity(p.saddr);
	}

	reason = enforce(&ec, &p, ec.src_identity, &r);
	if (reason)
		return drop_packet(skb, &ec, &p, &r, reason);
	count_forward(&ec, &p);
	r.target = dst->ifindex;
	write_result(skb, &r);
	if (r.ct == CT_NEW)
		emit_event(&ec, &p, EVENT_TRACE, TRACE_TO_LXC, EVENT_F_CT_NEW, 0);
	return TC_ACT_OK;
}
