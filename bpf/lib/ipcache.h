/* ipcache: every known prefix -> security identity (+ tunnel endpoint for remote pods). */
#ifndef PYLIUM_IPCACHE_H
#define PYLIUM_IPCACHE_H

#include "common.h"
#include "endpoints.h"

#define IPCACHE_MAX 65536

struct ipcache_key {
	__u32 prefixlen; /* LPM trie prefix, 0..32 bits of ip4 */
	__be32 ip4;
};

struct remote_endpoint_info {
	__u32 identity;
	__be32 tunnel_endpoint; /* 0 = not behind a tunnel */
	__u8 flags;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipcache_key);
	__type(value, struct remote_endpoint_info);
} ipcache SEC(".maps");

static __always_inline struct remote_endpoint_info *ipcache_lookup(__be32 ip4)
{
	struct ipcache_key key = { .prefixlen = 32, .ip4 = ip4 };

	return bpf_map_lookup_elem(&ipcache, &key);
}

/* The security identity of a peer address: local endpoint, else ipcache, else world. */
static __always_inline __u32 resolve_identity(__be32 ip4)
{
	struct endpoint_info *ep = lookup_endpoint(ip4);
	struct remote_endpoint_info *remote;

	if (ep)
		return ep->identity;
	remote = ipcache_lookup(ip4);
	return remote ? remote->identity : IDENTITY_WORLD;
}

#endif
