/* Redirect to the node's L7 proxy (a transparent listener in the node netns, the netns the
 * programs run in). Like Cilium's lib/proxy.h: the packet goes up the node's stack carrying
 * MARK_MAGIC_TO_PROXY, which a policy-routing rule the agent installs (fwmark 0x200/0xf00 ->
 * table 2004: `local 0.0.0.0/0 dev lo`) delivers locally, and bpf_sk_assign hands it to the
 * connection's proxy socket: the accepted socket of an established connection (looked up by
 * the original tuple), else the listener on the proxy port. The proxy thus sees the original
 * destination as getsockname() and the client as getpeername(). No socket = no proxy: the
 * packet is dropped (fail closed), never forwarded.
 *
 * bpf_sk_assign only works at tc ingress. Egress policy runs there (from_container); ingress
 * policy runs at tc egress (to_container), which hairpins the packet into the ingress of the
 * same veth (bpf_redirect BPF_F_INGRESS, proxy port in the mark) where from_container
 * assigns it — Cilium's ctx_redirect_to_proxy_hairpin idea. */
#ifndef PYLIUM_PROXY_H
#define PYLIUM_PROXY_H

#include "common.h"

/* CB_RESULT_TARGET of a packet sent to the proxy (its port is in CB_RESULT_VERDICT) */
#define TARGET_PROXY 0xFFFFFFFF

static __always_inline __u32 mark_encode_to_proxy(__u16 proxy_port)
{
	return ((__u32)proxy_port << 16) | MARK_MAGIC_TO_PROXY;
}

static __always_inline int is_to_proxy_mark(__u32 mark)
{
	return (mark & MARK_MAGIC_MASK) == MARK_MAGIC_TO_PROXY;
}

/* 0 if the proxies can take this packet's protocol (TCP), else the drop reason. */
static __always_inline __u8 proxy_supports(const struct pkt *p)
{
	return p->protocol == IPPROTO_TCP ? 0 : DROP_PROXY_UNKNOWN_PROTO;
}

/* Hand the packet to the proxy socket on this node. Returns 0 (assigned: pass it to the
 * stack with TC_ACT_OK) or a drop reason. A dry run only asks whether the program would:
 * no lookup, no assign. */
static __always_inline __u8 proxy_assign(struct __sk_buff *skb, const struct pkt *p,
					 __u16 proxy_port, int dry_run)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	long ret;

	if (proxy_supports(p))
		return proxy_supports(p);
	if (dry_run)
		return 0;
	tuple.ipv4.saddr = p->saddr;
	tuple.ipv4.daddr = p->daddr;
	tuple.ipv4.sport = p->sport;
	tuple.ipv4.dport = p->dport;
	/* an established (or half-open) proxy connection: its socket, by the original tuple.
	 * A TIME_WAIT one too: for a reused tuple's SYN the kernel's TIME_WAIT handling sends
	 * a challenge ACK, the client's RST ends the TIME_WAIT and its next SYN reaches the
	 * listener (handed to the listener directly, the SYN would be dropped: the kernel
	 * refuses a request socket whose tuple a TIME_WAIT socket holds). */
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			goto assign;
		bpf_sk_release(sk); /* a node listener on the original port: not the proxy */
	}
	tuple.ipv4.dport = bpf_htons(proxy_port);
	sk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return DROP_PROXY_LOOKUP_FAILED;
assign:
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret < 0)
		return DROP_PROXY_SET_FAILED;
	skb->mark = mark_encode_to_proxy(proxy_port);
	return 0;
}

#endif
