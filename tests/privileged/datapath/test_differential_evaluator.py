"""The whole chain against the oracle: random CiliumNetworkPolicy rule sets are resolved into
map states, loaded into the real BPF policy map, and >= 10,000 packets are run through the
attached programs with BPF_PROG_TEST_RUN; the kernel's verdict equals the reference
evaluator's (`pylium.policy.evaluate`, written without map states) — zero mismatches."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pylium.policy import evaluate
from pylium.policy.mapstate import PROTO_ICMP, Direction
from pylium.policy.resolve import resolve

from ...unit.policy.test_property_resolve import LABEL_SETS, NAMED_PORTS, rules, universe

RULE_SETS = 160
PACKETS_PER_RULE_SET = 64
SUBJECT_IDENTITY = 4000
SUBJECT_IP = "10.97.0.10"
PROTOS = [6, 6, 6, 6, 17, 132, 1]
PORTS = [80, 80, 80, 80, 53, 0, 8, 79, 81, 85, 90, 443, 1000, 8080]
ICMP_TYPES = [0, 8, 8, 3]  # for ICMP the key's "port" is the ICMP type


def peer_ip(index: int) -> str:
    return f"10.96.{index // 200}.{index % 200 + 1}"


def test_kernel_verdicts_equal_the_reference_evaluator(node):
    n = node("chain", {"subject": (SUBJECT_IP, SUBJECT_IDENTITY)})
    ep = n.eps["subject"]
    peers = universe([]).all()
    # every peer identity (endpoints, reserved, CIDR) answers for one address in the ipcache
    for index, peer in enumerate(peers):
        n.dp.upsert_ipcache(f"{peer_ip(index)}/32", peer.id)

    def run(cases):
        out = []
        for direction, index, proto, port in cases:
            icmp = proto == PROTO_ICMP
            sport = 7 if icmp else 40000 + index
            if direction == Direction.EGRESS:
                out.append(n.raw.trace(ep.ep_id, "egress", SUBJECT_IP, peer_ip(index), sport,
                                       port, proto))
            else:
                out.append(n.raw.trace(ep.ep_id, "ingress", peer_ip(index), SUBJECT_IP, sport,
                                       port, proto, src_identity=peers[index].id))
        return out

    totals = {"cases": 0, "allowed": 0, "denied": 0, "redirected": 0}
    mismatches = []
    revision = 0

    @settings(max_examples=RULE_SETS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(rules(l7_odds=70), min_size=1, max_size=4), st.sampled_from(LABEL_SETS),
           st.lists(st.tuples(st.sampled_from(list(Direction)),
                              st.integers(0, len(peers) - 1), st.sampled_from(PROTOS),
                              st.sampled_from(PORTS)),
                    min_size=PACKETS_PER_RULE_SET, max_size=PACKETS_PER_RULE_SET),
           st.sampled_from(["default", "default", "always", "never"]))
    def check(rule_list, subject, cases, mode):
        nonlocal revision
        revision += 1
        cache = universe(rule_list)
        policy = resolve(rule_list, subject, cache, mode=mode, named_ports=NAMED_PORTS)
        n.dp.update_policy(ep.ep_id, policy)
        cases = [(d, i, p, ICMP_TYPES[port % 4] if p == PROTO_ICMP else port)
                 for d, i, p, port in cases]
        for case, got in zip(cases, n.worker.run(run, cases), strict=True):
            direction, index, proto, port = case
            want = evaluate.direction_verdict(rule_list, subject, peers[index], direction,
                                              proto, port, mode, NAMED_PORTS)
            totals["cases"] += 1
            totals[want.verdict.value] += 1
            dropped = got["action"] == "dropped"
            if got["verdict"] != want.verdict.value or dropped != (want.verdict.value == "denied"):
                mismatches.append((rule_list, sorted(map(str, subject)), mode, case,
                                   want.verdict.value, got))

    check()
    assert totals["cases"] >= 10_000, totals
    # the random rule sets reach every outcome, not only default deny
    assert min(totals["allowed"], totals["denied"], totals["redirected"]) >= 100, totals
    print("kernel == reference evaluator:", totals)
    assert not mismatches, f"{len(mismatches)} of {totals['cases']} differ; first: {mismatches[0]}"
