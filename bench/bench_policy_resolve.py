"""Policy resolution at scale: 1,000 policies over 1,000 endpoints (300 distinct identities).

pylium: the incremental engine (per-identity map states, a selector cache whose selections
come from a label index of identities, rules grouped by subject and indexed by label,
per-rule contributions kept, one map state shared by identities that the same rules
select) resolving every endpoint from cold, then applying one more policy (re-resolving
only the identities it affects).
baseline: the best non-incremental engine — one resolution per distinct identity (and per
distinct set of selecting rules), selector selections and subject groups shared within the
pass, nothing kept between changes (the same engine built fresh for every change). Cold, the two do the same work (ratio ~1 is the
honest answer: incrementality only pays on a change); after one more policy the baseline
resolves every identity again.
Goals (issue 16): full resolution < 0.1 s, one added policy < 1 ms (CPU time on one core,
`time.process_time`; 5 interleaved rounds each side, medians and spread). Memory is
tracemalloc's peak during resolution (state + results; the parsed policies are not counted)."""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pylium.identity.cache import IdentityCache  # noqa: E402
from pylium.identity.labels import LabelSet  # noqa: E402
from pylium.identity.model import Identity  # noqa: E402
from pylium.policy.engine import PolicyEngine  # noqa: E402
from pylium.policy.load import load_text  # noqa: E402
from pylium.policy.repository import PolicyRepository  # noqa: E402
from pylium.policy.resolve import resolve  # noqa: E402

from bench.common import interleave, report, report_rounds  # noqa: E402

POLICIES = 1000
ENDPOINTS = 1000
APPS = 100
ROUNDS = 5
GOAL_FULL_S = 0.1
GOAL_ONE_S = 0.001


def policy_text(i: int) -> str:
    """A mix like a real cluster's: L3/L4 allows, some L7, some CIDR egress, some denies."""
    app, peer = f"svc-{i % APPS}", f"svc-{(i * 7 + 1) % APPS}"
    body = f"""  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts:
    - ports: [{{port: "{8000 + i % 50}", protocol: TCP}}]
"""
    if i % 10 == 0:
        body += "      rules: {http: [{method: GET, path: /api/.*}]}\n"
    if i % 20 == 0:
        body += f"  egress:\n  - toCIDR: [10.{i % 250}.0.0/16]\n"
    if i % 25 == 0:
        body += (f"  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: svc-{(i + 3) % APPS}, "
                 f"version: v1}}}}]\n")
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata: {{name: p{i}, namespace: default}}\nspec:\n{body}")


def endpoints() -> list[Identity]:
    """1,000 endpoints; endpoints with equal labels share an identity (300 of them)."""
    out, by_labels = [], {}
    for j in range(ENDPOINTS):
        labels = LabelSet.parse(f"app=svc-{j % APPS},version=v{j % 3},"
                                "k8s:io.kubernetes.pod.namespace=default")
        if labels not in by_labels:
            by_labels[labels] = Identity(256 + len(by_labels), labels)
        out.append(by_labels[labels])
    return out


def timed(fn):
    """(result, CPU seconds): one core, no tracing overhead."""
    gc.collect()
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def peak_mib(fn) -> float:
    """tracemalloc's peak while `fn` runs (a separate run: tracing slows Python down)."""
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    policies = [p for i in range(POLICIES) for p in load_text(policy_text(i))]
    extra = load_text(policy_text(POLICIES).replace(f"name: p{POLICIES}", "name: extra"))
    eps = endpoints()
    identities = sorted(set(eps), key=lambda i: i.id)

    def engine_over(pols):
        cache = IdentityCache(identities)
        repo = PolicyRepository()
        repo.add(pols)
        return PolicyEngine(repo, cache), repo

    def incremental_full():
        engine, repo = engine_over(policies)
        return engine, repo, [engine.endpoint_policy(ep) for ep in eps]

    def non_incremental(pols):
        """One resolution per distinct identity, endpoints sharing it take its result."""
        engine, _ = engine_over(pols)
        per_identity = {i.id: engine.endpoint_policy(i) for i in identities}
        return [per_identity[ep.id] for ep in eps]

    # both engines agree with the one-shot resolver (the reference) on a sample
    engine, repo, states = incremental_full()
    for ident in identities[::37]:
        assert engine.endpoint_policy(ident).entries == resolve(
            policies, ident, IdentityCache(identities)).entries, "engine disagrees"
    assert [s.entries for s in states] == [s.entries for s in non_incremental(policies)]
    entries = sum(len(s.entries) for s in states)

    def full_pylium() -> float:
        return timed(incremental_full)[1]

    def full_baseline() -> float:
        return timed(lambda: non_incremental(policies))[1]

    def one_pylium() -> float:
        engine, repo, _ = incremental_full()  # untimed: the state before the change

        def apply_one():
            repo.add(extra)
            return [engine.endpoint_policy(ep) for ep in eps]
        after, took = timed(apply_one)
        assert [s.entries for s in after] == [s.entries for s in non_incremental(
            policies + extra)], "engines disagree after the change"
        return took

    def one_baseline() -> float:
        return timed(lambda: non_incremental(policies + extra))[1]

    common = {"policies": POLICIES, "endpoints": ENDPOINTS, "identities": len(identities),
              "map_entries": entries}
    baseline_name = ("best non-incremental engine: one resolution per distinct identity, "
                     "nothing kept between changes")
    ours, theirs = interleave(full_pylium, full_baseline, ROUNDS)
    report_rounds("policy_resolve", "full_resolution", "s", ours, theirs, baseline_name,
                  f"lower is better; goal < {GOAL_FULL_S} s on one core (issue 16)",
                  lambda a, b: a < GOAL_FULL_S,
                  measures="CPU time to resolve every endpoint from cold, both sides", **common)
    ours, theirs = interleave(one_pylium, one_baseline, ROUNDS)
    report_rounds("policy_resolve", "apply_one_more_policy", "s", ours, theirs, baseline_name,
                  f"lower is better; goal < {GOAL_ONE_S * 1e3:g} ms (issue 16)",
                  lambda a, b: a < GOAL_ONE_S,
                  measures="CPU time from one added policy to every endpoint's map state",
                  **common)
    m_ours = peak_mib(incremental_full)
    m_theirs = peak_mib(lambda: non_incremental(policies))
    report("policy_resolve", "peak_memory", "MiB", m_ours, m_theirs, baseline_name,
           "lower is better; ratio <= 1.5 (the kept state costs at most half again)",
           met=m_ours <= 1.5 * m_theirs,
           measures="tracemalloc peak during a cold full resolution", **common)


if __name__ == "__main__":
    main()
