// SPDX-License-Identifier: Apache-2.0
/* VXLAN overlay programs (plugin `vxlan`), sharing the endpoint datapath's pinned maps.
 * Encapsulation by the kernel's collect_md device (plugin option `encapsulation: device`):
 *   to_overlay    tail-called by from_container (routing slot 0) for a destination behind a
 *                 tunnel endpoint: tunnel key = (remote node, VNI = source identity), then
 *                 redirect to the collect_md VXLAN device, which encapsulates.
 *   from_overlay  tc ingress of the VXLAN device: VNI = the sender's source identity, put
 *                 in skb->mark the way to_container reads it, then redirect to the local
 *                 endpoint's host veth (to_container enforces its ingress policy there).
 * -D VXLAN_IFINDEX=<the VXLAN device's ifindex in the node netns; 0 without a device>
 * Encapsulation in BPF (`encapsulation: bpf`): vxlan_egress / vxlan_ingress, below. */

#include <linux/udp.h>
#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/ipcache.h"
#include "lib/routing.h"

#ifndef VXLAN_IFINDEX
#error "VXLAN_IFINDEX must be defined"
#endif
#ifndef NODE_IP
#error "NODE_IP must be defined"
#endif
#ifndef VXLAN_PORT
#define VXLAN_PORT 8472
#endif
#define VNI_MASK 0xFFFFFF
#ifndef TUNNEL_TTL
#define TUNNEL_TTL 64
#endif
/* not in Debian's 6.1 uapi headers */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int to_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	key.remote_ipv4 = bpf_ntohl(skb->cb[CB_ROUTING_TUNNEL]);
	key.tunnel_id = skb->cb[CB_ROUTING_IDENTITY] & VNI_MASK;
	key.tunnel_ttl = TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(VXLAN_IFINDEX, 0);
}

SEC("tc")
int from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct endpoint_info *ep;
	struct ethhdr eth;
	struct iphdr ip;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT; /* pods are IPv4-only; ARP is never tunnelled */
	if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
		return TC_ACT_SHOT;
	ep = lookup_endpoint(ip.daddr);
	if (!ep)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, ep->mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, ep->host_mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = mark_encode_identity(key.tunnel_id & VNI_MASK);
	return bpf_redirect(ep->ifindex, 0);
}

/* ---- encapsulation in BPF (plugin option `encapsulation: bpf`): no VXLAN device ---------
 * On the node's underlay link, like the geneve plugin:
 *   vxlan_egress   tc egress: a packet from a local endpoint to a pod behind a tunnel
 *                  endpoint (ipcache) gets outer IPv4 / UDP VXLAN_PORT / VXLAN (I flag, VNI =
 *                  source identity) / inner Ethernet. The stack already routed it to the
 *                  remote node (a route per node), so the outer Ethernet header is right.
 *   vxlan_ingress  tc ingress: VXLAN to this node is decapsulated; the VNI becomes the
 *                  source identity in skb->mark and the packet is redirected to the local
 *                  endpoint's host veth, where to_container enforces its ingress policy.
 * -D NODE_IP=<this node's underlay IPv4, host order>  -D VXLAN_PORT=<UDP port> */

struct vxlanhdr_bpf {
	__be32 flags; /* 0x08000000: the I flag (VNI valid) */
	__be32 vni;   /* VNI << 8 */
};

struct vxlan_encap_hdr {
	struct iphdr ip;
	struct udphdr udp;
	struct vxlanhdr_bpf vxlan;
	struct ethhdr inner;
} __attribute__((packed));

#define VXLAN_ENCAP_LEN ((int)sizeof(struct vxlan_encap_hdr)) /* 50 */
#define VXLAN_FLAG_I 0x08000000

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
int vxlan_egress(struct __sk_buff *skb)
{
	struct remote_endpoint_info *remote;
	struct endpoint_info *ep;
	struct vxlan_encap_hdr h = {};
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
				sizeof(struct vxlanhdr_bpf) + inner_len);
	oip.check = ipv4_csum(&oip);
	__builtin_memcpy(&h.ip, &oip, sizeof(oip));
	/* source port from the inner flow's hash, as the kernel's VXLAN device does */
	h.udp.source = bpf_htons(0xC000 | (bpf_get_hash_recalc(skb) & 0x3FFF));
	h.udp.dest = bpf_htons(VXLAN_PORT);
	h.udp.len = bpf_htons(sizeof(struct udphdr) + sizeof(struct vxlanhdr_bpf) + inner_len);
	h.udp.check = 0; /* zero UDP checksum: allowed for VXLAN over IPv4 (RFC 7348 5) */
	h.vxlan.flags = bpf_htonl(VXLAN_FLAG_I);
	h.vxlan.vni = bpf_htonl((identity & VNI_MASK) << 8);
	__builtin_memcpy(&h.inner, &eth, sizeof(eth));

	if (bpf_skb_adjust_room(skb, VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int vxlan_ingress(struct __sk_buff *skb)
{
	struct endpoint_info *ep;
	struct vxlanhdr_bpf v;
	struct ethhdr eth;
	struct iphdr ip, inner_ip;
	struct udphdr udp;
	__u32 identity, ifindex;
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
	    udp.dest != bpf_htons(VXLAN_PORT))
		return TC_ACT_OK;
	off += sizeof(udp);
	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)) < 0)
		return TC_ACT_SHOT;
	if (!(v.flags & bpf_htonl(VXLAN_FLAG_I)))
		return TC_ACT_SHOT; /* no valid VNI: no identity to enforce on */
	identity = bpf_ntohl(v.vni) >> 8;
	off += sizeof(v) + sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, off - sizeof(struct ethhdr), &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT; /* pods are IPv4-only; ARP is never tunnelled */
	if (bpf_skb_load_bytes(skb, off, &inner_ip, sizeof(inner_ip)) < 0)
		return TC_ACT_SHOT;
	ep = lookup_endpoint(inner_ip.daddr);
	if (!ep)
		return TC_ACT_SHOT;
	ifindex = ep->ifindex;
	__builtin_memcpy(mac, ep->mac, 6);
	__builtin_memcpy(host_mac, ep->host_mac, 6);

	if (bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, host_mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = mark_encode_identity(identity & VNI_MASK);
	return bpf_redirect(ifindex, 0);
}
