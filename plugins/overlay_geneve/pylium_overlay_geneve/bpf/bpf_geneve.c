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

#include "lib/encap.h"

#ifndef GENEVE_PORT
#define GENEVE_PORT 6081
#endif
#define ETH_P_TEB 0x6558 /* Transparent Ethernet Bridging: Geneve carries Ethernet */

char LICENSE[] SEC("license") = "GPL";

struct genevehdr {
	__u8 ver_optlen; /* version (2 bits) | option length in 4-byte words (6 bits) */
	__u8 flags;      /* O | C | reserved */
	__be16 protocol;
	__u8 vni[3];
	__u8 reserved;
};

struct geneve_encap_hdr {
	struct udp_tunnel_outer outer;
	struct genevehdr geneve;
	struct ethhdr inner;
} __attribute__((packed));

SEC("tc")
int geneve_egress(struct __sk_buff *skb)
{
	struct geneve_encap_hdr h = {};
	__u32 identity;
	__be32 tunnel;

	if (!encap_classify(skb, &h.inner, &identity, &tunnel))
		return TC_ACT_OK;
	encap_outer(skb, &h.outer, tunnel, GENEVE_PORT, sizeof(struct genevehdr));
	h.geneve.protocol = bpf_htons(ETH_P_TEB);
	h.geneve.vni[0] = (identity >> 16) & 0xFF;
	h.geneve.vni[1] = (identity >> 8) & 0xFF;
	h.geneve.vni[2] = identity & 0xFF;
	return encap_push(skb, &h, sizeof(h));
}

SEC("tc")
int geneve_ingress(struct __sk_buff *skb)
{
	struct genevehdr g;
	__u32 identity, optlen;
	int off;

	if (!decap_match(skb, GENEVE_PORT, &off))
		return TC_ACT_UNSPEC; /* not ours: the hook's next filter (NodePort) decides */
	if (bpf_skb_load_bytes(skb, off, &g, sizeof(g)) < 0)
		return TC_ACT_SHOT;
	if ((g.ver_optlen >> 6) != 0 || g.protocol != bpf_htons(ETH_P_TEB))
		return TC_ACT_SHOT; /* unknown version, or not Ethernet inside */
	optlen = (g.ver_optlen & 0x3F) * 4;
	identity = ((__u32)g.vni[0] << 16) | ((__u32)g.vni[1] << 8) | g.vni[2];
	return decap_deliver(skb, off + sizeof(g) + optlen, identity);
}
