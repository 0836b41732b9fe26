"""Map-state helpers the agent applies before loading a policy into the datapath."""

from __future__ import annotations

from pylium.policy.mapstate import (
    PROTO_TCP,
    Direction,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    Verdict,
    deny_unserved_redirects,
    lookup,
)


def test_redirects_no_proxy_serves_become_denies_and_served_ones_stay():
    l7 = PolicyKey(256, Direction.INGRESS, PROTO_TCP, 80, 16)
    l4 = PolicyKey(256, Direction.INGRESS, PROTO_TCP, 443, 16)
    policy = EndpointPolicy(True, False, {l7: PolicyEntry(proxy_port=10080),
                                          l4: PolicyEntry()})
    closed, turned = deny_unserved_redirects(policy, set())
    assert turned == [l7]
    assert lookup(closed, 256, Direction.INGRESS, PROTO_TCP, 80).verdict == Verdict.DENY
    assert lookup(closed, 256, Direction.INGRESS, PROTO_TCP, 443).verdict == Verdict.ALLOW
    served, turned = deny_unserved_redirects(policy, {10080})
    assert turned == [] and served is policy
