// SPDX-License-Identifier: Apache-2.0
/* Geneve overlay done entirely in BPF (plugin `geneve`; no Geneve device is needed), on the
 * node's underlay link, sharing the endpoint datapath's pinned maps:
 *   geneve_egress   tc egress: a packet from a local endpoint to a pod behind a tunnel
 *                   endpoint (ipcache) gets outer IPv4 / UDP GENEVE_PORT / Geneve (VNI =
 *                   source identity, protocol Ethernet) / inner Ethernet. The stack already
 *                   routed it to the remote node (a route per node), so the outer Ethernet
 *                   header is right as it is.
 *   geneve_ingress  tc ingress: Geneve to this node is decapsulated; the VNI becomes the
 *                   source identity in skb->mark (as to_container reads it) and the packet
 *                   is redirected to the local endpoint's host veth, where to_container
 *                   enforces its ingress policy.
 * -D NODE_IP=<this node's underlay IPv4, host order>  -D GENEVE_PORT=<UDP port> */

#include <linux/udp.h>
#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/ipcache.h"

#ifndef NODE_IP
#error "NODE_IP must be defined"
#endif
#ifndef GENEVE_PORT
#define GENEVE_PORT 6081
#endif
#ifndef TUNNEL_TTL
#define TUNNEL_TTL 64
#endif
/* not in Debian's 6.1 uapi headers */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#define ETH_P_TEB 0x6558 /* Transparent Ethernet Bridging: Geneve carries Ethernet */
#define VNI_MASK 0xFFFFFF

char LICENSE[] SEC("license") = "GPL";

struct genevehdr {
	__u8 ver_optlen; /* version (2 bits) | option length in 4-byte words (6 bits) */
	__u8 flags;      /* O | C | reserved */
	__be16 protocol;
	__u8 vni[3];
	__u8 reserved;
};

struct encap_hdr {
	struct iphdr ip;
	struct udphdr udp;
	struct genevehdr geneve;
	struct ethhdr inner;
} __attribute__((packed));

#define ENCAP_LEN ((int)sizeof(struct encap_hdr)) /* 50 */

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

SEC("tc")
int geneve_egress(struct __sk_buff *skb)
{
	struct remote_endpoint_info *remote;
	struct endpoint_info *ep;
	struct encap_hdr h = {};
	struct ethhdr eth;
	struct iphdr ip, oip = {};
	__u32 identity, inner_len = skb->len;
	__be32 tunnel;
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr));

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
		return TC_ACT_OK;
	ep = lookup_endpoint(ip.saddr);
	if (!ep)
		return TC_ACT_OK; /* not from a local pod (the node itself, or already outer) */
	remote = ipcache_lookup(ip.daddr);
	if (!remote || !remote->tunnel_endpoint)
		return TC_ACT_OK;
	identity = ep->identity;
	tunnel = remote->tunnel_endpoint;

	oip.version = 4;
	oip.ihl = 5;
	oip.ttl = TUNNEL_TTL;
	oip.protocol = IPPROTO_UDP;
	oip.saddr = bpf_htonl(NODE_IP);
	oip.daddr = tunnel;
	oip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct udphdr) +
				sizeof(struct genevehdr) + inner_len);
	oip.check = ipv4_csum(&oip);
	__builtin_memcpy(&h.ip, &oip, sizeof(oip));
	/* source port from the inner flow's hash: spreads flows like the kernel's tunnels */
	h.udp.source = bpf_htons(0xC000 | (bpf_get_hash_recalc(skb) & 0x3FFF));
	h.udp.dest = bpf_htons(GENEVE_PORT);
	h.udp.len = bpf_htons(sizeof(struct udphdr) + sizeof(struct genevehdr) + inner_len);
	h.udp.check = 0; /* zero UDP checksum: allowed for IPv4 tunnels (RFC 8926 3.4) */
	h.geneve.protocol = bpf_htons(ETH_P_TEB);
	h.geneve.vni[0] = (identity >> 16) & 0xFF;
	h.geneve.vni[1] = (identity >> 8) & 0xFF;
	h.geneve.vni[2] = identity & 0xFF;
	__builtin_memcpy(&h.inner, &eth, sizeof(eth));

	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int geneve_ingress(struct __sk_buff *skb)
{
	struct endpoint_info *ep;
	struct genevehdr g;
	struct ethhdr eth;
	struct iphdr ip, inner_ip;
	struct udphdr udp;
	__u32 identity, optlen, ifindex;
	__u8 mac[6], host_mac[6];
	int off = sizeof(struct ethhdr);

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return TC_ACT_OK;
	if (ip.protocol != IPPROTO_UDP || ip.ihl != 5 || ip.daddr != bpf_htonl(NODE_IP) ||
	    (ip.frag_off & bpf_htons(0x3FFF)))
		return TC_ACT_OK;
	off += sizeof(ip);
	if (bpf_skb_load_bytes(skb, off, &udp, sizeof(udp)) < 0 ||
	    udp.dest != bpf_htons(GENEVE_PORT))
		return TC_ACT_OK;
	off += sizeof(udp);
	if (bpf_skb_load_bytes(skb, off, &g, sizeof(g)) < 0)
		return TC_ACT_SHOT;
	if ((g.ver_optlen >> 6) != 0 || g.protocol != bpf_htons(ETH_P_TEB))
		return TC_ACT_SHOT; /* unknown version, or not Ethernet inside */
	optlen = (g.ver_optlen & 0x3F) * 4;
	identity = ((__u32)g.vni[0] << 16) | ((__u32)g.vni[1] << 8) | g.vni[2];
	off += sizeof(g) + optlen + sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, off, &inner_ip, sizeof(inner_ip)) < 0)
		return TC_ACT_SHOT;
	ep = lookup_endpoint(inner_ip.daddr);
	if (!ep)
		return TC_ACT_SHOT;
	ifindex = ep->ifindex;
	__builtin_memcpy(mac, ep->mac, 6);
	__builtin_memcpy(host_mac, ep->host_mac, 6);

	if (bpf_skb_adjust_room(skb, -(ENCAP_LEN + (int)optlen), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, host_mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = mark_encode_identity(identity & VNI_MASK);
	return bpf_redirect(ifindex, 0);
}
