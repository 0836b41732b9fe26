// SPDX-License-Identifier: Apache-2.0
/* Socket-level load balancing (Cilium's bpf_sock.c idea), attached to a cgroup v2: a
 * connect() (TCP or UDP) or unconnected sendto() to a service VIP is rewritten to a backend
 * before any packet exists, so no per-packet translation happens at all; getpeername() and
 * recvmsg() of that socket show the VIP again. Same maps as the tc path (lib/lb.h). */

#include "lib/common.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* 0: not a service (untouched) or translated; -1: a service with no usable backend. */
static __always_inline int sock4_xlate(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct lb4_key key = { .address = ctx->user_ip4, .dport = (__be16)ctx->user_port,
			       .proto = proto };
	struct lb4_service *svc, *slot;
	struct lb4_backend *be;
	struct lb4_sock_key skey = {};
	struct lb4_sock_val sval = {};
	__u32 backend_id = 0, rev, idx, *id;
	__u64 cookie;
	void *lut;

	svc = bpf_map_lookup_elem(&lb4_services, &key);
	if (!svc)
		return 0;
	if (!svc->count)
		return -1;
	cookie = bpf_get_socket_cookie(ctx);
	if (svc->algorithm == LB_ALG_MAGLEV && svc->lut_size) {
		rev = svc->rev_nat_index;
		lut = bpf_map_lookup_elem(&lb4_maglev, &rev);
		if (lut) {
			idx = (__u32)(cookie % svc->lut_size);
			id = bpf_map_lookup_elem(lut, &idx);
			if (id)
				backend_id = *id;
		}
	} else {
		key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
		slot = bpf_map_lookup_elem(&lb4_services, &key);
		if (slot)
			backend_id = slot->backend_id;
	}
	be = lb4_usable_backend(backend_id, 1);
	if (!be)
		return -1;
	skey.cookie = cookie;
	skey.address = be->address;
	skey.port = be->port;
	sval.address = ctx->user_ip4;
	sval.port = (__be16)ctx->user_port;
	sval.rev_nat_index = svc->rev_nat_index;
	bpf_map_update_elem(&lb4_sock_revnat, &skey, &sval, BPF_ANY);
	ctx->user_ip4 = be->address;
	ctx->user_port = be->port;
	return 0;
}

static __always_inline void sock4_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_key skey = { .cookie = bpf_get_socket_cookie(ctx),
				     .address = ctx->user_ip4,
				     .port = (__be16)ctx->user_port };
	struct lb4_sock_val *sval = bpf_map_lookup_elem(&lb4_sock_revnat, &skey);

	if (!sval)
		return;
	ctx->user_ip4 = sval->address;
	ctx->user_port = sval->port;
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	__u8 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	return sock4_xlate(ctx, proto) < 0 ? SYS_REJECT : SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, IPPROTO_UDP) < 0 ? SYS_REJECT : SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_rev(ctx);
	return SYS_PROCEED;
}
