/* Routing-mode slot: remote destinations behind a tunnel endpoint are handed to the selected
 * routing plugin's program by a tail call into this pinned prog array (the plugin fills the
 * slot; an empty slot falls through and the node's stack routes the packet, which is what
 * native routing wants). Before the call, from_container leaves in skb->cb[] what the
 * plugin needs: the source identity and the tunnel endpoint (network order). */
#ifndef PYLIUM_ROUTING_H
#define PYLIUM_ROUTING_H

#include "common.h"

#define ROUTING_SLOT_REMOTE 0
#define ROUTING_SLOT_ENCRYPT 1 /* the encryption plugin's steering, before the routing mode */
#define ROUTING_SLOTS 4

#define CB_ROUTING_IDENTITY 0 /* source security identity */
#define CB_ROUTING_TUNNEL 1   /* __be32 tunnel endpoint (the remote node's underlay IP) */

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, ROUTING_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} routing_progs SEC(".maps");

#endif
