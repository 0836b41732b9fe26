// SPDX-License-Identifier: Apache-2.0
/* Runs the datapath's own mark functions (bpf/lib/common.h, bpf/lib/proxy.h) under
 * BPF_PROG_TEST_RUN so test_redirect_marks.py can hold pylium.datapath.marks equal to them.
 * In: cb[0] identity, cb[1] a mark to decode, cb[2] a proxy port.
 * Out: cb[0] mark_encode_identity, cb[1] mark_decode_identity, cb[2] mark_encode_to_proxy,
 *      cb[3] MARK_MAGIC_IDENTITY | MARK_MAGIC_TO_PROXY << 16,
 *      cb[4] MARK_MAGIC_PROXY_EGRESS | MARK_MAGIC_MASK << 16; skb->mark: MARK_MAGIC_DRYRUN. */
#include "lib/common.h"
#include "lib/proxy.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int marks(struct __sk_buff *skb)
{
	__u32 identity = skb->cb[0], mark = skb->cb[1], port = skb->cb[2];

	skb->cb[0] = mark_encode_identity(identity);
	skb->cb[1] = mark_decode_identity(mark);
	skb->cb[2] = mark_encode_to_proxy(port);
	skb->cb[3] = MARK_MAGIC_IDENTITY | (MARK_MAGIC_TO_PROXY << 16);
	skb->cb[4] = MARK_MAGIC_PROXY_EGRESS | (MARK_MAGIC_MASK << 16);
	skb->mark = MARK_MAGIC_DRYRUN;
	return TC_ACT_OK;
}
