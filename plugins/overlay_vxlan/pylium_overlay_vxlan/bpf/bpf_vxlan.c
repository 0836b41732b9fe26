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

#include "lib/encap.h"
#include "lib/routing.h"

#ifndef VXLAN_IFINDEX
#error "VXLAN_IFINDEX must be defined"
#endif
#ifndef VXLAN_PORT
#define VXLAN_PORT 8472
#endif
#define VNI_MASK TUNNEL_VNI_MASK

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
	struct udp_tunnel_outer outer;
	struct vxlanhdr_bpf vxlan;
	struct ethhdr inner;
} __attribute__((packed));

#define VXLAN_FLAG_I 0x08000000

SEC("tc")
int vxlan_egress(struct __sk_buff *skb)
{
	struct vxlan_encap_hdr h = {};
	__u32 identity;
	__be32 tunnel;

	if (!encap_classify(skb, &h.inner, &identity, &tunnel))
		return TC_ACT_OK;
	encap_outer(skb, &h.outer, tunnel, VXLAN_PORT, sizeof(struct vxlanhdr_bpf));
	h.vxlan.flags = bpf_htonl(VXLAN_FLAG_I);
	h.vxlan.vni = bpf_htonl((identity & VNI_MASK) << 8);
	return encap_push(skb, &h, sizeof(h));
}

SEC("tc")
int vxlan_ingress(struct __sk_buff *skb)
{
	struct vxlanhdr_bpf v;
	int off;

	if (!decap_match(skb, VXLAN_PORT, &off))
		return TC_ACT_UNSPEC; /* not ours: the hook's next filter (NodePort) decides */
	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)) < 0)
		return TC_ACT_SHOT;
	if (!(v.flags & bpf_htonl(VXLAN_FLAG_I)))
		return TC_ACT_SHOT; /* no valid VNI: no identity to enforce on */
	return decap_deliver(skb, off + sizeof(v), bpf_ntohl(v.vni) >> 8);
}
