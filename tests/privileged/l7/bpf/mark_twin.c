/* Runs the datapath's own mark_encode_identity/mark_decode_identity (bpf/lib/common.h) on
 * an identity given in cb[0], so a test compares them with pylium.datapath.marks. */
#include "lib/common.h"

SEC("tc")
int mark_twin(struct __sk_buff *skb)
{
	__u32 mark = mark_encode_identity(skb->cb[0]);

	skb->cb[1] = mark;
	skb->cb[2] = mark_decode_identity(mark);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
