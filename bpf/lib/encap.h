/* SPDX-License-Identifier: Apache-2.0 */
/* UDP tunnel encapsulation done in BPF, shared by the overlay plugins that carry pod traffic
 * without a tunnel device (geneve, vxlan with `encapsulation: bpf`). Each protocol supplies
 * only its own header between the outer UDP and the inner Ethernet; everything around it is
 * here:
 *   egress   encap_classify: is this a packet from a local endpoint to a pod behind a tunnel
 *            endpoint (ipcache)?  encap_outer: outer IPv4 + UDP for it.  encap_push: make
 *            room after the Ethernet header and write outer + tunnel header + inner Ethernet.
 *   ingress  decap_match: is this UDP to our tunnel port on this node? When it is not, the
 *            program returns TC_ACT_UNSPEC: the next filter on the hook (NodePort's
 *            from_netdev, priority 2) still sees the packet.  decap_deliver: strip
 *            the encapsulation, put the sender's identity in skb->mark (as to_container reads
 *            it) and redirect to the local endpoint's host veth.
 * Needs -D NODE_IP=<this node's underlay IPv4, host order>. */
#ifndef PYLIUM_ENCAP_H
#define PYLIUM_ENCAP_H

#include <linux/udp.h>
#include "common.h"
#include "endpoints.h"
#include "ipcache.h"

#ifndef NODE_IP
#error "NODE_IP must be defined"
#endif
#ifndef TUNNEL_TTL
#define TUNNEL_TTL 64
#endif
/* not in Debian's 6.1 uapi headers */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#define TUNNEL_VNI_MASK 0xFFFFFF

struct udp_tunnel_outer {
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

static __always_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return ~sum;
}

/* 1 with *eth, *identity (the local source endpoint's) and *tunnel (the remote node) filled
 * when the packet is to be encapsulated; 0 when it is not ours to touch. */
static __always_inline int encap_classify(struct __sk_buff *skb, struct ethhdr *eth,
					  __u32 *identity, __be32 *tunnel)
{
	struct remote_endpoint_info *remote;
	struct endpoint_info *ep;
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(*eth)) < 0 ||
	    eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(*eth), &ip, sizeof(ip)) < 0)
		return 0;
	ep = lookup_endpoint(ip.saddr);
	if (!ep)
		return 0; /* not from a local pod (the node itself, or already outer) */
	remote = ipcache_lookup(ip.daddr);
	if (!remote || !remote->tunnel_endpoint)
		return 0;
	*identity = ep->identity;
	*tunnel = remote->tunnel_endpoint;
	return 1;
}

/* The outer IPv4/UDP for a tunnel header of `tunnel_hdr_len` bytes around the whole inner
 * frame. The UDP checksum is zero (allowed for IPv4 tunnels: RFC 7348 5, RFC 8926 3.4); the
 * source port comes from the inner flow's hash, spreading flows as the kernel's tunnels do. */
static __always_inline void encap_outer(struct __sk_buff *skb, struct udp_tunnel_outer *o,
					__be32 tunnel, __u16 port, __u32 tunnel_hdr_len)
{
	__u32 inner_len = skb->len;
	struct iphdr oip = {};

	oip.version = 4;
	oip.ihl = 5;
	oip.ttl = TUNNEL_TTL;
	oip.protocol = IPPROTO_UDP;
	oip.saddr = bpf_htonl(NODE_IP);
	oip.daddr = tunnel;
	oip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct udphdr) +
				tunnel_hdr_len + inner_len);
	oip.check = ipv4_csum(&oip);
	__builtin_memcpy(&o->ip, &oip, sizeof(oip));
	o->udp.source = bpf_htons(0xC000 | (bpf_get_hash_recalc(skb) & 0x3FFF));
	o->udp.dest = bpf_htons(port);
	o->udp.len = bpf_htons(sizeof(struct udphdr) + tunnel_hdr_len + inner_len);
	o->udp.check = 0;
}

/* Room for `len` bytes after the (outer) Ethernet header, then `hdr` written there: the
 * stack already routed the packet to the remote node, so that Ethernet header is right. */
static __always_inline int encap_push(struct __sk_buff *skb, const void *hdr, __u32 len)
{
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr));

	if (bpf_skb_adjust_room(skb, len, BPF_ADJ_ROOM_MAC, flags) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), hdr, len, 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* 1 when the packet is unfragmented IPv4/UDP to `port` on this node; *off is then the offset
 * of the tunnel header. 0: not ours, let it pass. */
static __always_inline int decap_match(struct __sk_buff *skb, __u16 port, int *off)
{
	struct ethhdr eth;
	struct udphdr udp;
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.protocol != IPPROTO_UDP || ip.ihl != 5 || ip.daddr != bpf_htonl(NODE_IP) ||
	    (ip.frag_off & bpf_htons(0x3FFF)))
		return 0;
	if (bpf_skb_load_bytes(skb, sizeof(eth) + sizeof(ip), &udp, sizeof(udp)) < 0 ||
	    udp.dest != bpf_htons(port))
		return 0;
	*off = sizeof(eth) + sizeof(ip) + sizeof(udp);
	return 1;
}

/* The inner frame starts at `inner_off` (its Ethernet header): strip everything before it,
 * address it to the local endpoint and redirect there with the sender's identity. Inner
 * frames that are not IPv4 to a local endpoint are dropped: ARP is never tunnelled. */
static __always_inline int decap_deliver(struct __sk_buff *skb, int inner_off, __u32 identity)
{
	struct endpoint_info *ep;
	struct ethhdr inner_eth;
	struct iphdr inner_ip;
	__u8 mac[6], host_mac[6];
	__u32 ifindex;

	if (bpf_skb_load_bytes(skb, inner_off, &inner_eth, sizeof(inner_eth)) < 0 ||
	    inner_eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, inner_off + sizeof(inner_eth), &inner_ip,
			       sizeof(inner_ip)) < 0)
		return TC_ACT_SHOT;
	ep = lookup_endpoint(inner_ip.daddr);
	if (!ep)
		return TC_ACT_SHOT;
	ifindex = ep->ifindex;
	__builtin_memcpy(mac, ep->mac, 6);
	__builtin_memcpy(host_mac, ep->host_mac, 6);

	/* keep the outer Ethernet header; drop outer IP, UDP, the tunnel header and the inner
	 * Ethernet header: inner_off bytes from the end of the outer Ethernet header */
	if (bpf_skb_adjust_room(skb, -inner_off, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, host_mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = mark_encode_identity(identity & TUNNEL_VNI_MASK);
	return bpf_redirect(ifindex, 0);
}

#endif /* PYLIUM_ENCAP_H */
