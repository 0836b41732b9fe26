/* Packet/byte counters per (reason, direction); reason 0 = forwarded. */
#ifndef PYLIUM_METRICS_H
#define PYLIUM_METRICS_H

#include "common.h"

struct metrics_key {
	__u8 reason;
	__u8 direction;
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
} metrics SEC(".maps");

static __always_inline void metrics_count(__u8 reason, __u8 direction, __u32 len)
{
	struct metrics_key key = { .reason = reason, .direction = direction };
	struct metrics_value *v = bpf_map_lookup_elem(&metrics, &key);

	if (!v) {
		struct metrics_value zero = {};

		bpf_map_update_elem(&metrics, &key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&metrics, &key);
		if (!v)
			return;
	}
	v->packets += 1;
	v->bytes += len;
}

/* For a program tail-called after its caller counted the packet forwarded (from_container
 * counts before it tail-calls ROUTING_SLOT_ENCRYPT) that then drops it: a tail call never
 * returns, so the caller cannot count the drop instead, and the forwarded counter takes the
 * packet back. The tail call runs on the CPU that counted it (per-CPU value), so this never
 * takes back more than that CPU counted. */
static __always_inline void metrics_uncount_forward(__u8 direction, __u32 len)
{
	struct metrics_key key = { .reason = REASON_FORWARDED, .direction = direction };
	struct metrics_value *v = bpf_map_lookup_elem(&metrics, &key);

	if (!v || !v->packets)
		return;
	v->packets -= 1;
	v->bytes -= v->bytes < len ? v->bytes : len;
}

#endif
