"""policy: CiliumNetworkPolicy in, per-endpoint map states and explained verdicts out.

    load        YAML/JSON text and files → `rule.Policy`: `load_text`, `load_file`,
                `load_files`, `from_source` (errors: `errors.PolicyError.errors`, one
                `path: message` each)
    parse       the cattrs converter: plain data → models, errors named by path
    validate    Cilium's rule validation (`CHECKS` per model, refused `UNSUPPORTED` fields)
    namespace   Cilium's namespace translation of CNP/CCNP rules
    rule, selector, l4, http, kafka, dns, k8s
                the frozen model, split like Cilium's pkg/policy/api
    repository  `PolicyRepository` (revision, subscribers) + `PolicyStore` (KV persistence)
    engine      `PolicyEngine`: incremental per-identity map states
    resolve     the semantics, `resolve(...)` one-shot, `l7_allows(...)` for the proxy
    evaluate    the reference evaluator (oracle): `verdict`, `direction_verdict`
    trace       `trace(TraceQuery, policies)`; `register_datapath_tracer` for the BPF half
    component   agent start-up: `PolicyService(repository, store, engine)`

For the endpoint manager (agent): `svc = daemon.components["policy"]`, then
`svc.engine.endpoint_policy(identity_number, named_ports=None) -> mapstate.EndpointPolicy`
and `svc.engine.subscribe(callback)` where `callback(PolicyChange)` names the identity
numbers whose policy may have changed (returns an unsubscribe function)."""
