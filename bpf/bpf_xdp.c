// SPDX-License-Identifier: Apache-2.0
/* NodePort acceleration at XDP on the node's external interface (Cilium's
 * --bpf-lb-acceleration): a packet to a NodePort frontend whose backend is on this node is
 * DNATed in place before the stack allocates an skb, then passed on (XDP_PASS): the stack
 * routes it to the pod's veth, where to_container enforces the pod's ingress policy, and
 * the reply goes back through bpf_lxc's NodePort reverse NAT. Flows to backends on other
 * nodes (SNAT) and everything else pass untouched to the tc program (from_netdev), which
 * finds the same backend in the service-scope conntrack entry. Same maps (lib/lb.h). */

#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/ipcache.h"
#include "lib/conntrack.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline __u16 csum_fold64(__u64 csum)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		if (csum >> 16)
			csum = (csum & 0xffff) + (csum >> 16);
	}
	return ~csum;
}

/* RFC 1624 incremental update of a 16-bit one's complement checksum for a 4-byte change. */
static __always_inline void csum_update4(__u16 *csum, __be32 from, __be32 to)
{
	__u32 seed = ~((__u32)*csum) & 0xffff;

	*csum = csum_fold64(bpf_csum_diff(&from, 4, &to, 4, seed));
}

SEC("xdp")
int xdp_nodeport(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct endpoint_info *dst;
	struct pkt p = {};
	__be32 *ports, old_ports, new_ports, old_daddr;
	__u16 *l4_csum;
	__u8 *l4;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3FFF)))
		return XDP_PASS; /* options or fragments: the tc path handles them */
	l4 = (void *)(ip + 1);
	if (ip->protocol == IPPROTO_TCP) {
		if ((void *)(l4 + 20) > data_end)
			return XDP_PASS;
		l4_csum = (__u16 *)(l4 + 16);
		p.tcp_flags = l4[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		if ((void *)(l4 + 8) > data_end)
			return XDP_PASS;
		l4_csum = (__u16 *)(l4 + 6);
	} else {
		return XDP_PASS;
	}
	ports = (__be32 *)l4;
	p.saddr = ip->saddr;
	p.daddr = ip->daddr;
	p.sport = *(__be16 *)l4;
	p.dport = *(__be16 *)(l4 + 2);
	p.protocol = ip->protocol;
	p.len = data_end - data;
	svc = lb4_lookup_service(&p);
	if (!svc || !(svc->flags & SVC_F_NODEPORT))
		return XDP_PASS;
	be = lb4_pick_backend(&p, svc, resolve_identity(p.saddr), 0, 0);
	if (!be)
		return XDP_PASS; /* tc counts the drop ("Service backend not found") */
	dst = lookup_endpoint(be->address);
	if (!dst)
		return XDP_PASS; /* another node's backend: tc SNATs it */

	old_daddr = ip->daddr;
	old_ports = *ports;
	ip->daddr = be->address;
	*(__be16 *)(l4 + 2) = be->port;
	new_ports = *ports;
	csum_update4(&ip->check, old_daddr, be->address);
	if (ip->protocol == IPPROTO_TCP || *l4_csum) {
		csum_update4(l4_csum, old_daddr, be->address);
		csum_update4(l4_csum, old_ports, new_ports);
		if (ip->protocol == IPPROTO_UDP && !*l4_csum)
			*l4_csum = 0xffff;
	}
	p.daddr = be->address;
	p.dport = be->port;
	lb4_nodeport_remember(&p, svc->rev_nat_index, resolve_identity(p.saddr), dst->ep_id);
	return XDP_PASS;
}
