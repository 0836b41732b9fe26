/* Local endpoints: pod IPv4 -> where it is and who it is. */
#ifndef PYLIUM_ENDPOINTS_H
#define PYLIUM_ENDPOINTS_H

#include "common.h"

#define ENDPOINTS_MAX 16384

struct endpoint_key {
	__be32 ip4;
};

struct endpoint_info {
	__u32 ifindex;    /* host-side veth, in the node netns */
	__u16 ep_id;
	__u16 flags;
	__u32 identity;
	__u8 mac[6];      /* the endpoint's own (pod-side) MAC */
	__u8 host_mac[6]; /* the host-side veth's MAC */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENDPOINTS_MAX);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
} endpoints SEC(".maps");

static __always_inline struct endpoint_info *lookup_endpoint(__be32 ip4)
{
	struct endpoint_key key = { .ip4 = ip4 };

	return bpf_map_lookup_elem(&endpoints, &key);
}

#endif
