/* Shared definitions of every pylium BPF program: headers, reserved identities, drop
 * reasons (Cilium's pkg/monitor/api/drop.go codes), directions and the parsed packet. */
#ifndef PYLIUM_COMMON_H
#define PYLIUM_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* reserved identities (Cilium numbering) */
#define IDENTITY_ANY 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2

/* directions, relative to the endpoint the program runs for */
#define DIR_INGRESS 0
#define DIR_EGRESS 1

/* metric/event reason 0 = forwarded; the rest are Cilium drop reason codes */
#define REASON_FORWARDED 0
#define DROP_INVALID_SIP 132
#define DROP_POLICY 133
#define DROP_INVALID 134
#define DROP_UNSUPPORTED_L3 139
#define DROP_WRITE_ERROR 141
#define DROP_NO_LOCAL_ENDPOINT 152
#define DROP_FRAG_NOSUPPORT 157
#define DROP_NO_CONFIG 165
#define DROP_PROXY_LOOKUP_FAILED 178 /* "Socket lookup failed": no proxy listens */
#define DROP_PROXY_SET_FAILED 179    /* "Socket assign failed" */
#define DROP_PROXY_UNKNOWN_PROTO 180 /* "Proxy redirection not supported for protocol" */
#define DROP_POLICY_DENY 181
/* pylium's own: a pod packet to a node without an encryption key (encryption on, plaintext
 * not allowed); Cilium has no code for it */
#define DROP_UNENCRYPTED 220

/* skb->mark: Cilium's MARK_MAGIC_IDENTITY idea. 0x0F00 = the source identity is carried in
 * the other bits (from-container sets it before redirecting to a local endpoint; the node's
 * L7 proxy sets it, with SO_MARK, on its upstream socket: the identity of the client it
 * speaks for). 0x0B00 = the same from an egress proxy that wants the destination's own L7
 * ingress rules applied again (Cilium's MARK_MAGIC_PROXY_EGRESS). 0x0200 = to the proxy,
 * its port in the upper 16 bits (lib/proxy.h; Cilium's MARK_MAGIC_TO_PROXY). Marks never
 * cross into a pod's netns (the kernel clears them), so a pod cannot forge one.
 * Dry run (`pylium policy trace --datapath`, BPF_PROG_TEST_RUN): mark 0x0D00 AND
 * cb[2] == TRACE_CB_DRYRUN; no CT writes, no events, no metrics. A dry run may carry the
 * source identity in cb[0] when cb[1] == TRACE_CB_IDENTITY. */
#define MARK_MAGIC_MASK 0x0F00
#define MARK_MAGIC_IDENTITY 0x0F00
#define MARK_MAGIC_PROXY_EGRESS 0x0B00
#define MARK_MAGIC_TO_PROXY 0x0200
#define MARK_MAGIC_DRYRUN 0x0D00
#define TRACE_CB_IDENTITY 0x70796c6d /* "pylm" */
#define TRACE_CB_DRYRUN 0x64727972   /* "dryr" */

static __always_inline int is_dry_run(const struct __sk_buff *skb)
{
	return (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_DRYRUN &&
	       skb->cb[2] == TRACE_CB_DRYRUN;
}

/* cb[] slots the programs write on exit (read back by BPF_PROG_TEST_RUN's ctx_out) */
#define CB_RESULT_REASON 0    /* 0 forwarded, else drop reason */
#define CB_RESULT_VERDICT 1   /* policy verdict | proxy_port << 16 (0 = no lookup) */
#define CB_RESULT_IDENTITY 2  /* the peer identity the policy was asked about */
#define CB_RESULT_CT 3        /* CT_NEW / CT_ESTABLISHED / CT_REPLY */
#define CB_RESULT_TARGET 4    /* ifindex redirected to (0 = to the stack) */

static __always_inline __u32 mark_encode_identity(__u32 identity)
{
	return ((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF) | MARK_MAGIC_IDENTITY;
}

static __always_inline __u32 mark_decode_identity(__u32 mark)
{
	return (mark >> 16) | ((mark & 0xFF) << 16);
}

/* Everything the programs need from a packet's headers. */
struct pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;        /* conntrack tuple ports (ICMP echo: identifier) */
	__be16 dport;
	__be16 policy_port;  /* destination port, or the ICMP type, for the policy lookup */
	__be16 event_dport;  /* dport, or ICMP type << 8 | code, for events */
	__u8 protocol;
	__u8 tcp_flags;
	__u16 pad;
	__u32 len;
};

#define PARSE_OK 0
#define PARSE_PASS 1 /* not IPv4: ARP and other L2 pass untouched */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Returns PARSE_OK, PARSE_PASS or a drop reason. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p)
{
	struct ethhdr eth;
	struct iphdr ip;
	__u8 l4[14];
	__u32 l4_off;

	p->len = skb->len;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return DROP_INVALID;
	if (eth.h_proto == bpf_htons(ETH_P_IPV6))
		return DROP_UNSUPPORTED_L3; /* IPv4-only datapath: fail closed */
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return PARSE_PASS;
	if (bpf_skb_load_bytes(skb, sizeof(eth), &ip, sizeof(ip)) < 0)
		return DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return DROP_INVALID;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->protocol = ip.protocol;
	/* fragments carry no (or partial) L4 header: ports cannot be checked */
	if (ip.frag_off & bpf_htons(0x3FFF))
		return DROP_FRAG_NOSUPPORT;
	l4_off = sizeof(eth) + ip.ihl * 4;
	switch (ip.protocol) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, l4_off, l4, 14) < 0)
			return DROP_INVALID;
		p->tcp_flags = l4[13];
		/* fallthrough */
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (ip.protocol != IPPROTO_TCP && bpf_skb_load_bytes(skb, l4_off, l4, 4) < 0)
			return DROP_INVALID;
		p->sport = *(__be16 *)&l4[0];
		p->dport = *(__be16 *)&l4[2];
		p->policy_port = p->dport;
		p->event_dport = p->dport;
		break;
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, l4_off, l4, 6) < 0)
			return DROP_INVALID;
		p->policy_port = bpf_htons(l4[0]);
		p->event_dport = bpf_htons(((__u16)l4[0] << 8) | l4[1]);
		if (l4[0] == 8) {          /* echo request: identifier is the "source port" */
			p->sport = *(__be16 *)&l4[4];
		} else if (l4[0] == 0) {   /* echo reply: mirrors the request's tuple */
			p->dport = *(__be16 *)&l4[4];
		} else {                   /* other types: one flow per type/code */
			p->dport = p->event_dport;
		}
		break;
	default:
		break;
	}
	return PARSE_OK;
}

#endif
