"""`pylium k8s manifest`: every object validates offline against Kubernetes' schemas
(kubernetes-validate, strict), the CRD schemas accept every policy pylium's parser accepts,
and the plugin selection reaches the agent config."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from pylium.cli.main import cli
from pylium.policy.errors import PolicyError
from pylium.policy.load import CCNP, CNP, load_text
from pylium_orchestrator_k8s import manifest

#: the oldest schemas kubernetes-validate ships; the privileged tests apply the same objects
#: to the real 1.20 API server
SCHEMA_VERSION = "1.25.0"


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_manifest_command_validates_strictly_against_kubernetes_schemas():
    result = _cli("k8s", "manifest", "--plugins", "vxlan,etcd,http",
                  "--kvstore-endpoints", "http://10.0.0.1:2379", "--api-server", "10.0.0.1:6443")
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount",
                     "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)


def test_validation_is_real_a_broken_daemonset_is_refused():
    ds = manifest.daemonset(image="x:1", plugins=[])
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, SCHEMA_VERSION, strict=True)
    ds = manifest.daemonset(image="x:1", plugins=[])
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, SCHEMA_VERSION, strict=True)


def test_selection_becomes_agent_config_and_daemonset():
    docs = manifest.manifests(["geneve", "etcd", "http", "kafka"], image="reg/pylium:9",
                              pod_cidr="10.9.0.0/24", kvstore_endpoints="http://a:2379",
                              pull_policy="Never")
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]
                            ["config.yaml"])
    assert config["orchestrator"] == "kubernetes"
    assert config["routing_mode"] == "geneve"
    assert config["kvstore"] == "etcd"
    assert config["l7_parsers"] == ["http", "kafka"]
    assert config["kvstore_options"] == {"endpoints": ["http://a:2379"]}
    assert config["pod_cidr"] == "10.9.0.0/24"
    assert config["plugin_options"]["kubernetes"]["cni_conf_dir"] == "/host/etc/cni/net.d"
    ds = docs[-1]
    pod = ds["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "None"
    assert agent["securityContext"]["privileged"] is True
    assert agent["image"] == "reg/pylium:9" and agent["imagePullPolicy"] == "Never"
    assert agent["readinessProbe"]["exec"]["command"][-2:] == ["k8s", "health"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert "/host/etc/cni/net.d" in mounts and "/var/run/pylium" in mounts
    assert manifest.distributions(["geneve", "etcd"]) == [
        "pylium", "pylium-orchestrator-k8s", "pylium-overlay-geneve", "pylium-kvstore-etcd"]


@pytest.mark.parametrize("plugins, message", [
    ("vxla", "unknown plugin 'vxla'"),
    ("vxlan,geneve", "vxlan and geneve are both a routing_mode"),
    ("etcd", "--plugins etcd needs --kvstore-endpoints"),
])
def test_bad_selection_is_one_line_error(plugins, message):
    result = _cli("k8s", "manifest", "--plugins", plugins)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_api_server_and_cidr_are_refused():
    assert "not HOST:PORT" in _cli("k8s", "manifest", "--api-server", "nohost").output
    assert "--pod-cidr" in _cli("k8s", "manifest", "--pod-cidr", "10.0.0.0/33").output


def _crd_schema(kind: str) -> dict:
    crd = next(c for c in manifest.crds() if c["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _policy_documents(paths):
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in (CNP, CCNP):
                yield path, doc


def test_crd_schemas_accept_the_example_policies(example_policies):
    docs = list(_policy_documents(sorted(example_policies.glob("*.yaml"))))
    assert docs, "examples/policies holds Cilium policies"
    for _path, doc in docs:
        jsonschema.validate(doc, _crd_schema(doc["kind"]))


def test_crd_schema_refuses_what_the_parser_refuses_at_the_selector():
    doc = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector:
    matchExpressions: [{key: app, operator: Maybe}]
""")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema(CNP))
    with pytest.raises(PolicyError):
        load_text(yaml.safe_dump(doc))


def test_crd_schemas_accept_every_corpus_policy_the_parser_accepts(cilium_corpus):
    """Nothing pylium enforces is refused by the API server first."""
    checked = 0
    for path in sorted(cilium_corpus.rglob("*.yaml")):
        try:
            load_text(path.read_text())  # templates and refused files are refused here
        except PolicyError:
            continue
        for _path, doc in _policy_documents([path]):
            jsonschema.validate(doc, _crd_schema(doc["kind"]))
            checked += 1
    assert checked > 20
