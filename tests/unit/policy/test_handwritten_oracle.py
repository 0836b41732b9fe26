"""A second oracle for selector and default-deny semantics, independent of pylium's code:
verdicts written down by hand, in the manner of Cilium's `pkg/policy/distillery_test.go`
(small rule combinations — L3 only, L4 only, L3+L4, deny over allow, empty rules, default
deny switched off — each with the verdict Cilium gives). The policies go in as YAML text,
so the parser and the namespace translation are inside the check; both the reference
evaluator (`policy.evaluate`) and the resolver's map state (`resolve` + `mapstate.lookup`,
what the datapath enforces) must give the hand-written answer. Neither can vouch for the
other here: they share `policy/selector.py` and `Rule.default_deny`, the table does not."""

from __future__ import annotations

import pytest
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import RESERVED_BY_NAME, RESERVED_IDENTITIES, Identity
from pylium.policy import evaluate
from pylium.policy.load import load_text
from pylium.policy.mapstate import Direction, lookup
from pylium.policy.resolve import resolve

NS = "io.kubernetes.pod.namespace"
PODS = {
    "web": Identity(1000, LabelSet.parse(f"app=web,{NS}=default")),
    "foo": Identity(1001, LabelSet.parse(f"app=foo,{NS}=default")),
    "bar": Identity(1002, LabelSet.parse(f"app=bar,{NS}=default")),
    "foo-other": Identity(1003, LabelSet.parse(f"app=foo,{NS}=other")),
    "nolabel": Identity(1004, LabelSet.parse(f"{NS}=default")),
}
PEERS = {**PODS, "world": RESERVED_IDENTITIES[RESERVED_BY_NAME["world"]],
         "host": RESERVED_IDENTITIES[RESERVED_BY_NAME["host"]]}
IN, OUT = Direction.INGRESS, Direction.EGRESS
TCP, UDP = 6, 17


def cnp(spec: str, name: str = "p", kind: str = "CiliumNetworkPolicy",
        namespace: str = "default") -> str:
    meta = f"{{name: {name}" + (f", namespace: {namespace}}}" if kind != "CiliumClusterwideNetworkPolicy" else "}")
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\nspec:\n{body}\n"


WEB = "endpointSelector: {matchLabels: {app: web}}\n"

#: (name, policy text, [(direction, peer, proto, port, verdict)]) — verdicts by hand
CASES = [
    ("no policy selects web: nothing enforced", "", [
        (IN, "foo", TCP, 80, "allowed"), (IN, "world", TCP, 80, "allowed"),
        (OUT, "bar", UDP, 53, "allowed")]),
    ("a policy for another pod leaves web open", cnp(
        "endpointSelector: {matchLabels: {app: bar}}\ningress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n"), [
        (IN, "bar", TCP, 80, "allowed"), (IN, "world", TCP, 1, "allowed")]),
    ("L3 only: foo on every port and protocol, nobody else", cnp(
        WEB + "ingress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "foo", UDP, 9999, "allowed"),
        (IN, "bar", TCP, 80, "denied"), (IN, "world", TCP, 80, "denied"),
        # namespace translation: a namespaced policy's peers are in its namespace
        (IN, "foo-other", TCP, 80, "denied"),
        (OUT, "bar", TCP, 80, "allowed")]),  # egress not enforced by an ingress rule
    ("L4 only: port 80/TCP from anyone, world included", cnp(
        WEB + "ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "world", TCP, 80, "allowed"),
        (IN, "foo-other", TCP, 80, "allowed"), (IN, "foo", TCP, 81, "denied"),
        (IN, "foo", UDP, 80, "denied")]),
    ("L3+L4: foo on 80/TCP only", cnp(
        WEB + "ingress:\n- fromEndpoints: [{matchLabels: {app: foo}}]\n"
              "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "foo", TCP, 81, "denied"),
        (IN, "bar", TCP, 80, "denied"), (IN, "foo", UDP, 80, "denied")]),
    ("L3 rule and L4 rule add up (union)",
     cnp(WEB + "ingress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n", "a") + "---\n" +
     cnp(WEB + "ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]\n", "b"), [
        (IN, "bar", TCP, 80, "allowed"), (IN, "foo", TCP, 81, "allowed"),
        (IN, "bar", TCP, 81, "denied")]),
    ("deny wins over allow-all", cnp(
        WEB + "ingress: [{fromEntities: [all]}]\n"
              "ingressDeny: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n"), [
        (IN, "foo", TCP, 80, "denied"), (IN, "bar", TCP, 80, "allowed"),
        (IN, "world", TCP, 443, "allowed")]),
    ("L4 deny under an L3 allow: only that port is closed", cnp(
        WEB + "ingress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n"
              "ingressDeny:\n- fromEndpoints: [{matchLabels: {app: foo}}]\n"
              "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"), [
        (IN, "foo", TCP, 80, "denied"), (IN, "foo", TCP, 81, "allowed"),
        (IN, "bar", TCP, 81, "denied")]),
    ("an empty ingress rule switches on default deny and allows nothing", cnp(
        WEB + "ingress: [{}]\n"), [
        (IN, "foo", TCP, 80, "denied"), (IN, "world", TCP, 80, "denied"),
        (OUT, "foo", TCP, 80, "allowed")]),
    ("fromEndpoints [{}]: every pod of the policy's namespace, no one else", cnp(
        WEB + "ingress: [{fromEndpoints: [{}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "nolabel", TCP, 80, "allowed"),
        (IN, "foo-other", TCP, 80, "denied"), (IN, "world", TCP, 80, "denied"),
        (IN, "host", TCP, 80, "denied")]),
    ("clusterwide fromEndpoints [{}]: pods of every namespace", cnp(
        WEB + "ingress: [{fromEndpoints: [{}]}]\n", kind="CiliumClusterwideNetworkPolicy"), [
        (IN, "foo-other", TCP, 80, "allowed"), (IN, "foo", TCP, 80, "allowed"),
        (IN, "world", TCP, 80, "denied")]),
    ("egress only: ingress stays open, egress default-denies", cnp(
        WEB + "egress: [{toEndpoints: [{matchLabels: {app: foo}}]}]\n"), [
        (OUT, "foo", TCP, 80, "allowed"), (OUT, "bar", TCP, 80, "denied"),
        (OUT, "world", TCP, 443, "denied"), (IN, "bar", TCP, 80, "allowed")]),
    ("enableDefaultDeny ingress false: the allow adds nothing, others stay open", cnp(
        WEB + "enableDefaultDeny: {ingress: false}\n"
              "ingress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "bar", TCP, 80, "allowed"),
        (IN, "world", TCP, 80, "allowed")]),
    ("enableDefaultDeny off, but a deny still denies", cnp(
        WEB + "enableDefaultDeny: {ingress: false}\n"
              "ingressDeny: [{fromEndpoints: [{matchLabels: {app: bar}}]}]\n"), [
        (IN, "bar", TCP, 80, "denied"), (IN, "foo", TCP, 80, "allowed")]),
    ("default deny off in one policy, on in another: on wins", cnp(
        WEB + "enableDefaultDeny: {ingress: false}\n"
              "ingress: [{fromEndpoints: [{matchLabels: {app: foo}}]}]\n", "a") + "---\n" +
     cnp(WEB + "ingress: [{fromEndpoints: [{matchLabels: {app: bar}}]}]\n", "b"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "bar", TCP, 80, "allowed"),
        (IN, "world", TCP, 80, "denied")]),
    ("egress to world only", cnp(WEB + "egress: [{toEntities: [world]}]\n"), [
        (OUT, "world", TCP, 443, "allowed"), (OUT, "foo", TCP, 443, "denied"),
        (OUT, "host", TCP, 443, "denied")]),
    ("matchExpressions In", cnp(
        WEB + "ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: In, "
              "values: [foo, bar]}]}]}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "bar", TCP, 80, "allowed"),
        (IN, "nolabel", TCP, 80, "denied"), (IN, "foo-other", TCP, 80, "denied")]),
    ("matchExpressions NotIn matches pods without the label, in the namespace", cnp(
        WEB + "ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, "
              "values: [foo]}]}]}]\n"), [
        (IN, "bar", TCP, 80, "allowed"), (IN, "nolabel", TCP, 80, "allowed"),
        (IN, "foo", TCP, 80, "denied"), (IN, "world", TCP, 80, "denied")]),
    ("Exists and DoesNotExist", cnp(
        WEB + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: app, operator: DoesNotExist}]}]\n"
              "  toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n"
              "- fromEndpoints: [{matchExpressions: [{key: app, operator: Exists}]}]\n"
              "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"), [
        (IN, "nolabel", TCP, 22, "allowed"), (IN, "nolabel", TCP, 80, "denied"),
        (IN, "foo", TCP, 80, "allowed"), (IN, "foo", TCP, 22, "denied")]),
    ("a subject selector in another namespace does not select web", cnp(
        WEB + "ingress: [{}]\n", namespace="other"), [
        (IN, "foo", TCP, 80, "allowed")]),
    ("Kubernetes NetworkPolicy: podSelector and ports", (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        "metadata: {name: k, namespace: default}\n"
        "spec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n"
        "  ingress:\n  - from: [{podSelector: {matchLabels: {app: foo}}}]\n"
        "    ports: [{port: 80, protocol: TCP}]\n"), [
        (IN, "foo", TCP, 80, "allowed"), (IN, "foo", TCP, 81, "denied"),
        (IN, "foo-other", TCP, 80, "denied"), (IN, "bar", TCP, 80, "denied"),
        (OUT, "bar", TCP, 80, "allowed")]),
    ("Kubernetes NetworkPolicy with no ingress rules: deny all ingress", (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        "metadata: {name: k, namespace: default}\n"
        "spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n"), [
        (IN, "foo", TCP, 80, "denied"), (IN, "world", TCP, 80, "denied")]),
]


@pytest.mark.parametrize("name,text,checks", CASES, ids=[c[0] for c in CASES])
def test_hand_written_verdicts(name, text, checks):
    rules = [r for p in load_text(text) for r in p.rules] if text else []
    subject = PODS["web"]
    cache = IdentityCache(PODS.values())
    policy = resolve(rules, subject.labels, cache)
    for direction, peer, proto, port, want in checks:
        reference = evaluate.direction_verdict(rules, subject.labels, PEERS[peer], direction,
                                               proto, port).verdict.value
        mapped = lookup(policy, PEERS[peer].id, direction, proto, port).verdict.value
        assert (reference, mapped) == (want, want), \
            f"{name}: {direction.name} {peer} {proto}/{port}: by hand {want}, " \
            f"evaluator {reference}, map state {mapped}"
