"""Parsing: every accepted form, every refusal naming its field, and the whole corpus."""

from __future__ import annotations

import json

import pytest
from pylium.policy.errors import PolicyError, PolicyWarning
from pylium.policy.load import from_source, load_file, load_text
from pylium.policy.selector import Requirement
from pylium.policy.validate import NOT_ENFORCED

CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p1{ns}}}
spec:
{spec}
"""


def cnp(spec: str, ns: str = "") -> str:
    return CNP.format(spec=spec, ns=f", namespace: {ns}" if ns else "")


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_text(text)
    return info.value.errors


@pytest.mark.parametrize("spec, expected", [
    ("""  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - port: "99999\"""",
     'spec.ingress[0].toPorts[0].ports[0].port: "99999" is not a port (0-65535)'),
    ("""  endpointSelector: {}
  ingress:
  - toPorts:
    - ports:
      - {port: "80", protocol: TPC}""",
     'spec.ingress[0].toPorts[0].ports[0].protocol: "TPC" is not a protocol (TCP, UDP, SCTP, ANY)'),
    ("""  endpointSelector: {}
  egress:
  - toCIDR: [10.0.0.0/33]""",
     'spec.egress[0].toCIDR[0]: "10.0.0.0/33" is not a CIDR'),
    ("""  endpointSelector: {}
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]""",
     "spec.egress[0].toCIDRSet[0].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8"),
    ("""  endpointSelector: {}
  ingress:
  - fromEntities: [galaxy]""",
     'spec.ingress[0].fromEntities[0]: "galaxy" is not an entity'),
    ("""  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {a: b}, matchExpression: []}]""",
     "spec.ingress[0].fromEndpoints[0].matchExpression: unknown field"),
    ("""  endpointSelector: {}
  ingress:
  - fromNodes: [{matchLabels: {a: b}}]""",
     "spec.ingress[0].fromNodes: node selectors (fromNodes) are not supported yet"),
    ("""  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: UDP}]
      rules: {http: [{method: GET}]}""",
     "spec.ingress[0].toPorts[0].ports[0].protocol: L7 rules can only apply to TCP"),
    ("""  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules: {dns: [{matchName: a.com}]}""",
     "spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress"),
    ("""  endpointSelector: {}
  ingress:
  - icmps: [{fields: [{type: 8}]}]
    toPorts: [{ports: [{port: "80"}]}]""",
     "spec.ingress[0].icmps: the icmps block may only be present without toPorts"),
    ("""  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80", endPort: 70, protocol: TCP}]""",
     "spec.ingress[0].toPorts[0].ports[0].endPort: endPort 70 is below port 80"),
    ("""  ingress: [{}]""",
     "spec: rule must have one of endpointSelector or nodeSelector"),
    ("""  endpointSelector: {}
  enableDefaultDeny: {ingress: "no"}""",
     'spec.enableDefaultDeny.ingress: "no" is not true or false'),
    ("""  endpointSelector: {}
  egress:
  - toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules: {kafka: [{role: write}]}""",
     'spec.egress[0].toPorts[0].rules.kafka[0].role: "write" is not a role'),
    ("""  endpointSelector:
      matchExpressions: [{key: a, operator: in, values: [b]}]""",
     'spec.endpointSelector.matchExpressions[0].operator: "in" is not an operator'),
    ("""  endpointSelector: {}
  ingress: {fromEndpoints: []}""",
     "spec.ingress: must be a list"),
    # a deny rule pylium cannot enforce would deny nothing: refused, never a silent allow
    ("""  endpointSelector: {}
  egressDeny:
  - toServices: [{k8sService: {serviceName: db, namespace: prod}}]""",
     "spec.egressDeny[0].toServices: toServices is not enforced yet by pylium: in a deny "
     "rule it would deny nothing"),
    ("""  endpointSelector: {}
  egressDeny:
  - toFQDNs: [{matchName: example.com}]""",
     "spec.egressDeny[0].toFQDNs: toFQDNs is not allowed in egressDeny rules"),
])
def test_errors_name_the_path(spec, expected):
    errors = errors_of(cnp(spec))
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_of_a_document_are_reported():
    errors = errors_of(cnp("""  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "99999"}]}]
  egress:
  - toEntities: [moon]"""))
    assert len(errors) == 2


FQDN_RULE = """  endpointSelector: {matchLabels: {app: x}}
  egress:
  - toEndpoints: [{matchLabels: {app: y}}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts: [{ports: [{port: "443"}]}]
  - toServices: [{k8sService: {serviceName: db, namespace: prod}}]
    toEndpoints: [{matchLabels: {app: z}}]"""


def test_fields_accepted_but_not_enforced_are_warnings_naming_rule_and_field():
    (policy,) = load_text(cnp(FQDN_RULE))
    assert policy.warnings == (
        PolicyWarning("spec.egress[1].toFQDNs", NOT_ENFORCED["toFQDNs"]),
        PolicyWarning("spec.egress[2].toServices", NOT_ENFORCED["toServices"]))
    assert str(policy.warnings[0]) == (
        "spec.egress[1].toFQDNs: not enforced yet by pylium (no DNS proxy learns the names' "
        "addresses): selects no peers, so the traffic it would allow is denied")
    assert len(policy.rules[0].egress) == 3  # accepted: the rule is kept, not dropped
    # the store re-parses the document it persisted: the warnings come back with it
    (again,) = from_source(policy.kind, policy.name, policy.source)
    assert again.warnings == policy.warnings


def test_warning_paths_follow_specs_documents_and_rule_lists():
    text = cnp("  endpointSelector: {}") + """specs:
- endpointSelector: {}
- endpointSelector: {}
  egress: [{toFQDNs: [{matchPattern: "*.example.com"}]}]
---
""" + cnp(FQDN_RULE).replace("name: p1", "name: p2")
    first, second = load_text(text)
    assert [w.path for w in first.warnings] == ["documents[0].specs[1].egress[0].toFQDNs"]
    assert [w.path for w in second.warnings] == ["documents[1].spec.egress[1].toFQDNs",
                                                 "documents[1].spec.egress[2].toServices"]
    (rules,) = load_text(json.dumps([{"endpointSelector": {}},
                                     {"endpointSelector": {},
                                      "egress": [{"toServices": [{"k8sService": {
                                          "serviceName": "db"}}]}]}]))
    assert [w.path for w in rules.warnings] == ["[1].egress[0].toServices"]


def test_policies_without_such_fields_have_no_warnings():
    (policy,) = load_text(cnp("""  endpointSelector: {}
  egress:
  - toEndpoints: [{}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
  - toFQDNs: []"""))
    assert policy.warnings == ()


def test_kinds_api_versions_and_top_level_keys():
    assert "kind: 'Deployment' is not a policy kind" in errors_of(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")[0]
    assert errors_of("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\n"
                     "metadata: {name: x}\nspec: {endpointSelector: {}}")[0].startswith(
        "apiVersion: 'cilium.io/v1' is not valid for CiliumNetworkPolicy")
    assert errors_of("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                     "metadata: {name: x}\nspex: {}")[0] == "spex: unknown field"
    # lower-case apiversion and a top-level description are accepted, as upstream writes them
    (policy,) = load_text("apiversion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                          "description: d\nmetadata: {name: x}\nspec: {endpointSelector: {}}")
    assert (policy.name, policy.namespace, policy.description) == ("x", "default", "d")


def test_spec_and_specs_multi_document_yaml_and_namespaces():
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a, namespace: prod}
spec: {endpointSelector: {matchLabels: {app: x}}}
specs:
- endpointSelector: {matchLabels: {app: y}}
- endpointSelector: {matchLabels: {app: z}}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: b}
spec: {endpointSelector: {}}
"""
    a, b = load_text(text)
    assert len(a.rules) == 3 and a.namespace == "prod"
    assert dict(a.rules[1].endpoint_selector.match_labels) == {
        "app": "y", "k8s:io.kubernetes.pod.namespace": "prod"}
    assert b.namespace == "" and b.rules[0].endpoint_selector.is_wildcard


def test_peer_selectors_get_cilium_namespace_translation():
    (policy,) = load_text(cnp("""  endpointSelector: {}
  ingress:
  - fromEndpoints:
    - {}
    - matchLabels: {k8s:io.kubernetes.pod.namespace: other}
    - matchLabels: {io.cilium.k8s.namespace.labels.team: a}
    - matchLabels: {reserved:host: ""}
    fromRequires:
    - matchLabels: {env: prod}""", ns="prod"))
    sels = policy.rules[0].ingress[0].from_endpoints
    assert dict(sels[0].match_labels) == {"k8s:io.kubernetes.pod.namespace": "prod"}
    assert dict(sels[1].match_labels) == {"k8s:io.kubernetes.pod.namespace": "other"}
    assert "k8s:io.kubernetes.pod.namespace" not in dict(sels[2].match_labels)
    assert dict(sels[3].match_labels) == {"reserved:host": ""}
    requires = policy.rules[0].ingress[0].from_requires[0]
    assert dict(requires.match_labels) == {"env": "prod",
                                           "k8s:io.kubernetes.pod.namespace": "prod"}
    # cluster-wide: peers must at least be pods
    (ccnp,) = load_text("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
                        "metadata: {name: c}\nspec:\n  endpointSelector: {}\n"
                        "  ingress: [{fromEndpoints: [{}]}]")
    sel = ccnp.rules[0].ingress[0].from_endpoints[0]
    assert sel.match_expressions == (Requirement("k8s:io.kubernetes.pod.namespace", "Exists"),)


def test_json_rule_lists_are_case_insensitive_like_go():
    text = json.dumps([{
        "labels": [{"key": "name", "value": "r1"}],
        "endpointSelector": {"matchLabels": {"app": "kafka"}},
        "ingress": [{"toPorts": [{"ports": [{"port": "9092", "protocol": "tcp"}],
                                  "rules": {"Kafka": [{"Role": "Produce", "topic": "t"}]}}]}],
    }])
    (policy,) = load_text(text, "rules-file")
    assert policy.kind == "RuleList" and policy.namespace == ""
    port_rule = policy.rules[0].ingress[0].to_ports[0]
    assert port_rule.ports[0].protocol == "TCP"
    assert port_rule.rules.kafka[0].role == "produce"
    assert policy.rule_name(0) == "r1"


def test_named_ports_icmp_names_and_port_ranges():
    (policy,) = load_text(cnp("""  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: HTTP-alt, protocol: TCP}, {port: 8000, endPort: 8080}]}]
  - icmps: [{fields: [{type: EchoRequest, family: IPv6}, {type: 8}]}]"""))
    ports = policy.rules[0].ingress[0].to_ports[0].ports
    assert ports[0].port == "http-alt" and ports[0].is_named
    assert (ports[1].port, ports[1].end_port, ports[1].protocol) == ("8000", 8080, "ANY")
    fields = policy.rules[0].ingress[1].icmps[0].fields
    assert [(f.type, f.family) for f in fields] == [(128, "IPv6"), (8, "IPv4")]


def test_kubernetes_network_policy_translates_to_rules():
    (policy,) = load_text("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
    - namespaceSelector: {matchLabels: {team: ops}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports: [{port: 5432}]
  policyTypes: [Ingress, Egress]
""")
    rule = policy.rules[0]
    assert dict(rule.endpoint_selector.match_labels) == {
        "app": "db", "k8s:io.kubernetes.pod.namespace": "shop"}
    ingress = rule.ingress
    assert dict(ingress[0].from_endpoints[0].match_labels) == {
        "app": "api", "k8s:io.kubernetes.pod.namespace": "shop"}
    assert dict(ingress[1].from_endpoints[0].match_labels) == {
        "k8s:io.cilium.k8s.namespace.labels.team": "ops"}
    assert ingress[2].from_cidr_set[0].except_ == ("10.1.0.0/16",)
    assert ingress[0].to_ports[0].ports[0].protocol == "TCP"
    assert len(rule.egress) == 1 and not rule.egress[0].l3_present  # deny all egress


def test_templates_and_bad_yaml_are_refused_with_a_line():
    assert errors_of("spec:\n  cidr: {{.ExternalCIDR}}\n")[0].startswith(
        "line 2: unrendered Go template placeholder")
    assert errors_of("a: [\n")[0].startswith("line ")


def test_corpus_every_file_loads_or_is_refused_naming_a_field(cilium_corpus, capsys):
    corpus = cilium_corpus
    files = sorted(p for p in corpus.rglob("*") if p.suffix in (".yaml", ".json"))
    assert len(files) > 150
    loaded, refused = [], []
    for path in files:
        try:
            policies = load_file(path)
        except PolicyError as exc:
            refused.append((path, exc.errors))
            for error in exc.errors:
                # "<file>: <field path or line N>: <message>"
                where, _, message = error[len(str(path)) + 2:].partition(": ")
                assert where and message, error
        else:
            assert policies and all(p.rules for p in policies), path
            loaded.append(path)
    with capsys.disabled():
        print(f"\npolicy corpus: {len(loaded)} files load, {len(refused)} refused:")
        for path, errors in refused:
            print(f"  {path.relative_to(corpus)}: {errors[0][len(str(path)) + 2:]}"
                  + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    refused_names = {p.name for p, _ in refused}
    # upstream oddities refused on purpose, with the field named
    assert {"multi_rule.yaml", "lock-down-ingress.yaml", "demo-pods.yaml",
            "envoy_forward_proxy_cec.yaml"} <= refused_names
    assert len(loaded) >= 140


def test_example_policies_load(example_policies):
    paths = sorted(example_policies.glob("*.yaml"))
    assert [p.name for p in paths] == ["cidr-rule.yaml", "l3-l4-rule1.yaml", "l7-rule1.yaml"]
    for path in paths:
        (policy,) = load_file(path)
        assert policy.namespace == "default" and policy.description
