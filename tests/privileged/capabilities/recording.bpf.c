/* The recording test plugin's BPF: one tc program and a map of its own. The core compiles
 * it with the record's defines (RECORDING_KIND says which capability's copy this is). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#ifndef RECORDING_KIND
#error "the core must pass the record's defines"
#endif

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} recording_hits SEC(".maps");

SEC("tc")
int recording_prog(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *hits = bpf_map_lookup_elem(&recording_hits, &key);

	if (hits)
		__sync_fetch_and_add(hits, RECORDING_KIND);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
