// SPDX-License-Identifier: Apache-2.0
/* WireGuard steering (plugin `wireguard`), sharing the endpoint datapath's pinned maps:
 *   to_wireguard  tail-called by from_container (routing slot ROUTING_SLOT_ENCRYPT) for every
 *                 destination that is not a local endpoint. A destination inside the pod CIDR
 *                 of a remote node that has a WireGuard peer is redirected into the
 *                 WireGuard device (the pod packet itself, no tunnel inside: Cilium's
 *                 `encapsulate: false`). A remote node without a published key, or a remote
 *                 pod (ipcache: behind a tunnel endpoint) of a node the plugin does not know,
 *                 is dropped and counted (DROP_UNENCRYPTED) unless ALLOW_PLAINTEXT. Anything
 *                 else (the world, node addresses) goes where it went before: the routing
 *                 mode's slot, else the node's stack.
 * Decrypted packets come out of the WireGuard device into the node's stack, which routes them
 * to the endpoint's veth; to_container finds the source identity in the ipcache.
 * -D WG_IFINDEX=<the WireGuard device's ifindex>  -D ALLOW_PLAINTEXT=0|1 */

#include "lib/common.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/routing.h"

#ifndef WG_IFINDEX
#error "WG_IFINDEX must be defined"
#endif
#ifndef ALLOW_PLAINTEXT
#define ALLOW_PLAINTEXT 0
#endif

#define WG_NODES_MAX 4096
#define WG_NODE_F_PEER 0x01 /* the node published a key and is a peer of the device */

char LICENSE[] SEC("license") = "GPL";

struct wg_node_key {
	__u32 prefixlen; /* LPM trie prefix over ip4 */
	__be32 ip4;      /* a remote node's pod CIDR */
};

struct wg_node {
	__be32 node_ip; /* the node's underlay address (its WireGuard endpoint) */
	__u8 flags;     /* WG_NODE_F_* */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, WG_NODES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct wg_node_key);
	__type(value, struct wg_node);
} wg_nodes SEC(".maps");

static __always_inline int plaintext(struct __sk_buff *skb)
{
	if (skb->cb[CB_ROUTING_TUNNEL])
		bpf_tail_call(skb, &routing_progs, ROUTING_SLOT_REMOTE);
	return TC_ACT_OK; /* the routing slot is empty: the node's stack routes it */
}

/* An event about this packet, from the endpoint that sent it (from_container left the
 * source identity in cb[] and its conntrack result in the result slots). */
static __always_inline int event(struct __sk_buff *skb, __u8 type, __u8 reason, __u8 flags,
				 __u32 *len)
{
	struct event_ctx ec = { .ifindex = skb->ifindex, .direction = DIR_EGRESS,
				.src_identity = skb->cb[CB_ROUTING_IDENTITY] };
	struct pkt p = {};

	if (parse_packet(skb, &p) != PARSE_OK)
		return -1;
	*len = p.len;
	emit_event(&ec, &p, type, reason, flags, 0);
	return 0;
}

/* from_container counted the packet forwarded before it tail-called this program: a drop
 * here takes it back off that counter and counts it dropped instead. */
static __always_inline int drop_unencrypted(struct __sk_buff *skb)
{
	__u32 len = skb->len; /* from_container's count used the same length */

	metrics_uncount_forward(DIR_EGRESS, len);
	metrics_count(DROP_UNENCRYPTED, DIR_EGRESS, len);
	event(skb, EVENT_DROP, DROP_UNENCRYPTED, 0, &len);
	return TC_ACT_SHOT;
}

SEC("tc")
int to_wireguard(struct __sk_buff *skb)
{
	struct wg_node_key key = { .prefixlen = 32 };
	struct wg_node *node;
	struct ethhdr eth;
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    eth.h_proto != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
		return plaintext(skb); /* from_container parsed it already: cannot happen */
	key.ip4 = ip.daddr;
	node = bpf_map_lookup_elem(&wg_nodes, &key);
	if (node && (node->flags & WG_NODE_F_PEER)) {
		__u32 len;

		/* a new connection's flow says it left encrypted (Hubble's IP.encrypted) */
		if (skb->cb[CB_RESULT_CT] == CT_NEW)
			event(skb, EVENT_TRACE, TRACE_TO_CRYPTO, EVENT_F_CT_NEW | EVENT_F_ENCRYPTED,
			      &len);
		return bpf_redirect(WG_IFINDEX, 0);
	}
	if (!node && !skb->cb[CB_ROUTING_TUNNEL])
		return plaintext(skb); /* not a pod of another node: the world, a node address */
	if (ALLOW_PLAINTEXT)
		return plaintext(skb);
	return drop_unencrypted(skb);
}
