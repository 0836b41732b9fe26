"""Property test of the incremental engine's shortcuts (the label index of subjects and
peers, per-rule contributions kept between resolutions, one map state shared by identities
selected by the same rules): after any sequence of policy and identity changes, every
identity's map state equals a from-scratch `resolve` of the repository's rules (itself held
to the reference evaluator by test_property_resolve.py), and a change announces every
identity whose map state it changed."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import Label, LabelSet
from pylium.identity.model import Identity
from pylium.policy.engine import PolicyEngine
from pylium.policy.repository import PolicyRepository
from pylium.policy.resolve import resolve
from pylium.policy.rule import IngressRule, Policy, Rule
from pylium.policy.selector import EndpointSelector

from tests.unit.policy.test_property_resolve import ENDPOINT_IDENTITIES, NAMED_PORTS, rules

#: identities that come and go during a run (beyond the fixed ones)
EXTRA = [Identity(300 + i, LabelSet([Label("k8s", "app", a), Label("k8s", "role", "z"),
                                     Label("k8s", "io.kubernetes.pod.namespace", "default")]))
         for i, a in enumerate(("a", "b", "c"))]

operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.lists(rules(), min_size=1, max_size=2)),
    st.tuples(st.just("delete"), st.integers(0, 3)),
    st.tuples(st.just("identity+"), st.sampled_from(EXTRA)),
    st.tuples(st.just("identity-"), st.sampled_from(EXTRA)),
    st.tuples(st.just("mode"), st.sampled_from(["default", "always", "never"])),
), min_size=1, max_size=8)


def grants(policy) -> dict:
    """The L7 grants per key, order aside (the engine may list rules in another order)."""
    return {k: sorted(map(repr, g)) for k, g in policy.l7.items()}


def check(engine: PolicyEngine, repo: PolicyRepository, cache: IdentityCache,
          ports: dict | None) -> None:
    for identity in cache.all():
        got = engine.endpoint_policy(identity.id, ports)
        want = resolve(repo.policies(), identity, cache, mode=engine.mode, named_ports=ports)
        assert got.entries == want.entries, identity
        assert (got.ingress_enforced, got.egress_enforced) == (
            want.ingress_enforced, want.egress_enforced), identity
        assert grants(got) == grants(want), identity


#: a peer selector cached before an identity it selects arrives (the peer index must offer
#: the new identity to it)
FROM_APP_A = Rule(endpoint_selector=EndpointSelector(), ingress=(
    IngressRule(from_endpoints=(EndpointSelector((("app", "a"),)),)),))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations, st.sampled_from([None, NAMED_PORTS]))
@example([("add", 0, [FROM_APP_A]), ("identity+", EXTRA[0]), ("identity-", EXTRA[0])], None)
def test_engine_after_changes_equals_resolution_from_scratch(ops, ports):
    cache = IdentityCache(ENDPOINT_IDENTITIES)
    repo = PolicyRepository()
    engine = PolicyEngine(repo, cache)
    announced: set[int] = set()
    engine.subscribe(lambda change: announced.update(change.identities))
    check(engine, repo, cache, ports)
    for op in ops:
        before = {i.id: engine.endpoint_policy(i.id, ports) for i in cache.all()}
        announced.clear()
        if op[0] == "add":
            repo.add([Policy("CiliumNetworkPolicy", f"p{op[1]}", "default", tuple(op[2]))])
        elif op[0] == "delete":
            if repo.find(f"p{op[1]}", "default"):
                repo.delete(f"p{op[1]}", "default")
        elif op[0] == "identity+":
            cache.add(op[1])
        elif op[0] == "identity-":
            cache.remove(op[1].id)
        else:
            engine.set_mode(op[1])
        check(engine, repo, cache, ports)
        for number, old in before.items():
            new = engine.endpoint_policy(number, ports) if number in cache else None
            if new is None or new.entries != old.entries or (
                    new.ingress_enforced, new.egress_enforced) != (
                    old.ingress_enforced, old.egress_enforced):
                assert number in announced, (op[0], number)
