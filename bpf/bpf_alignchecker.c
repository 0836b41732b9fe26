// SPDX-License-Identifier: Apache-2.0
/* Not attached anywhere: compiled only so that its BTF describes every map key/value and
 * the event record, which tests/unit/datapath compare with the Python ctypes mirrors
 * (Cilium's bpf_alignchecker.c idea). */

#include "lib/common.h"
#include "lib/endpoints.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "GPL";

struct endpoint_key anchor_endpoint_key __attribute__((used));
struct endpoint_info anchor_endpoint_info __attribute__((used));
struct ipcache_key anchor_ipcache_key __attribute__((used));
struct remote_endpoint_info anchor_remote_endpoint_info __attribute__((used));
struct policy_key anchor_policy_key __attribute__((used));
struct policy_entry anchor_policy_entry __attribute__((used));
struct ct_key anchor_ct_key __attribute__((used));
struct ct_entry anchor_ct_entry __attribute__((used));
struct metrics_key anchor_metrics_key __attribute__((used));
struct metrics_value anchor_metrics_value __attribute__((used));
struct pylium_event anchor_pylium_event __attribute__((used));
struct lb4_key anchor_lb4_key __attribute__((used));
struct lb4_service anchor_lb4_service __attribute__((used));
struct lb4_backend anchor_lb4_backend __attribute__((used));
struct lb4_reverse_nat anchor_lb4_reverse_nat __attribute__((used));
struct lb4_affinity_key anchor_lb4_affinity_key __attribute__((used));
struct lb4_affinity_val anchor_lb4_affinity_val __attribute__((used));
struct lb4_sock_key anchor_lb4_sock_key __attribute__((used));
struct lb4_sock_val anchor_lb4_sock_val __attribute__((used));
