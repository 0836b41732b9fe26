/* Burst generator for the flow reader's loss accounting test: every run emits one DROP event
 * through the real datapath's emit_event() (bpf/lib/events.h: its `events` ring buffer and
 * `events_lost` per-CPU counter), numbered 1, 2, 3 ... in pkt_len. */
#include "lib/events.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} burst_seq SEC(".maps");

SEC("tc")
int burst(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&burst_seq, &zero);
	struct event_ctx ec = {
		.ifindex = 7, .src_identity = 1003, .dst_identity = 1001, .ep_id = 11,
		.direction = DIR_INGRESS,
	};
	struct pkt p = {
		.saddr = bpf_htonl(0x0ac8000c), .daddr = bpf_htonl(0x0ac8000a),
		.sport = bpf_htons(43210), .event_dport = bpf_htons(80),
		.protocol = IPPROTO_TCP, .tcp_flags = TCP_FLAG_SYN,
	};

	if (!seq)
		return TC_ACT_OK;
	*seq += 1; /* BPF_PROG_TEST_RUN repeats run one after another on one CPU */
	p.len = (__u32)*seq;
	emit_event(&ec, &p, EVENT_DROP, DROP_POLICY, 0, 0);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
