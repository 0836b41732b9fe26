"""Policy resolution at scale: 1,000 policies over 1,000 endpoints.

pylium: the incremental engine (per-identity map states, selector cache) resolving every
endpoint from cold, then applying one more policy (re-resolving only what it affects).
baseline: what a non-incremental engine does — resolve each endpoint from scratch with no
shared state (`resolve.resolve` per endpoint), and again for everything after one change.
Goal from issue 3: full resolution under 1 s on one core (CPU time, `time.process_time`).
Memory is tracemalloc's peak during resolution (state + results; the 1,000 parsed policies
exist before and are not counted)."""

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

from bench.common import report  # noqa: E402

POLICIES = 1000
ENDPOINTS = 1000
APPS = 100


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

    def incremental_full():
        cache = IdentityCache(identities)
        repo = PolicyRepository()
        repo.add(policies)
        engine = PolicyEngine(repo, cache)
        states = [engine.endpoint_policy(ep) for ep in eps]
        return engine, repo, states

    def naive_full(pols):
        cache = IdentityCache(identities)
        return [resolve(pols, ep, cache) for ep in eps]

    m_full = peak_mib(incremental_full)
    m_naive = peak_mib(lambda: naive_full(policies))
    (engine, repo, states), t_full = timed(incremental_full)
    naive_states, t_naive = timed(lambda: naive_full(policies))
    assert [s.entries for s in states] == [s.entries for s in naive_states], "engines disagree"
    entries = sum(len(s.entries) for s in states)

    def apply_one():
        repo.add(extra)
        return [engine.endpoint_policy(ep) for ep in eps]

    after, t_one = timed(apply_one)
    naive_after, t_naive_one = timed(lambda: naive_full(policies + extra))
    assert [s.entries for s in after] == [s.entries for s in naive_after], "engines disagree"

    common = {"policies": POLICIES, "endpoints": ENDPOINTS, "identities": len(identities),
              "map_entries": entries}
    report("policy_resolve", "full_resolution", "s", t_full, t_naive,
           "per-endpoint resolution from scratch", "lower is better; goal < 1 s on one core",
           **common)
    report("policy_resolve", "peak_memory", "MiB", m_full, m_naive,
           "per-endpoint resolution from scratch", "lower is better", **common)
    report("policy_resolve", "apply_one_more_policy", "s", t_one, t_naive_one,
           "re-resolve every endpoint from scratch", "lower is better", **common)


if __name__ == "__main__":
    main()
