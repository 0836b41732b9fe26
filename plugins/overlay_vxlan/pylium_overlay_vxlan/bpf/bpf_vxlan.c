// SPDX-License-Identifier: Apache-2.0
/* VXLAN overlay programs (plugin `vxlan`), sharing the endpoint datapath's pinned maps:
 *   to_overlay    tail-called by from_container (routing slot 0) for a destination behind a
 *                 tunnel endpoint: tunnel key = (remote node, VNI = source identity), then
 *                 redirect to the collect_md VXLAN device, which encapsulates.
 *   from_overlay  tc ingress of the VXLAN device: VNI = the sender's source identity, put
 *                 in skb->mark the way to_container reads it, then redirect to the local
 *                 endpoint's host veth (to_container enforces its ingress policy there).
 * -D VXLAN_IFINDEX=<the VXLAN device's ifindex in the node netns> */

#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/routing.h"

#ifndef VXLAN_IFINDEX
#error "VXLAN_IFINDEX must be defined"
#endif
#define VNI_MASK 0xFFFFFF
#ifndef TUNNEL_TTL
#define TUNNEL_TTL 64
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
