"""Deploy manifests: the Cilium policy CRDs, RBAC, the agent's ConfigMap and its DaemonSet.

`pylium k8s manifest --plugins vxlan,etcd,...` prints them as one YAML stream. The plugin
selection becomes both the agent config (which capability each plugin fills) and the image's
contents (`pylium k8s image` installs the same distributions). The CRD schemas accept what
pylium's policy parser accepts: selectors are typed; rule bodies keep unknown fields for the
agent's parser, which reports field errors in `status.nodes.<node>.error`."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import attrs
import yaml
from pylium.errors import UserError

NAMESPACE = "kube-system"
NAME = "pylium"
DEFAULT_IMAGE = "registry.local/pylium:0.1.0"
CONFIG_PATH = "/etc/pylium/config.yaml"
SOCKET = "/var/run/pylium/pylium.sock"
#: where the init container sees the node's CNI bin directory
CNI_BIN_MOUNT = "/host/opt/cni/bin"

#: --plugins names → (capability kind, capability name, distribution)
PLUGINS: dict[str, tuple[str, str, str]] = {
    "vxlan": ("routing_mode", "vxlan", "pylium-overlay-vxlan"),
    "geneve": ("routing_mode", "geneve", "pylium-overlay-geneve"),
    "native": ("routing_mode", "native", "pylium-native-routing"),
    "etcd": ("kvstore", "etcd", "pylium-kvstore-etcd"),
    "consul": ("kvstore", "consul", "pylium-kvstore-consul"),
    "http": ("l7_parsers", "http", "pylium-l7-http"),
    "kafka": ("l7_parsers", "kafka", "pylium-l7-kafka"),
    "wireguard": ("encryption", "wireguard", "pylium-encryption-wireguard"),
}
ORCHESTRATOR_DIST = "pylium-orchestrator-k8s"


def parse_plugins(text: str | Iterable[str]) -> list[str]:
    """`vxlan,etcd` → ["vxlan", "etcd"]; unknown names and two of one kind are user errors."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)
             if n.strip()]
    seen: dict[str, str] = {}
    for name in names:
        if name not in PLUGINS:
            raise UserError(f"--plugins: unknown plugin {name!r} (known: {', '.join(PLUGINS)})")
        kind = PLUGINS[name][0]
        if kind != "l7_parsers" and kind in seen:
            raise UserError(f"--plugins: {seen[kind]} and {name} are both a {kind}; pick one")
        seen.setdefault(kind, name)
    return list(dict.fromkeys(names))


def distributions(plugins: Iterable[str]) -> list[str]:
    """The distributions an image for this selection installs (the core comes first)."""
    return ["pylium", ORCHESTRATOR_DIST] + [PLUGINS[p][2] for p in plugins]


@attrs.frozen
class HostPaths:
    """Where the agent's files live on the node (the container sees them at fixed paths).
    `run` holds the API socket `pylium-cni` talks to, so the conflist names it there."""

    run: str = "/var/run/pylium"
    state: str = "/var/lib/pylium"
    cni_conf: str = "/etc/cni/net.d"
    bpffs_root: str = "/sys/fs/bpf/pylium"
    #: the runtime's CNI bin directory: the init container installs `pylium-cni` there
    cni_bin: str = "/opt/cni/bin"


def agent_config(plugins: Iterable[str], *, pod_cidr: str, kvstore_endpoints: str = "",
                 paths: HostPaths = HostPaths()) -> dict[str, Any]:
    config: dict[str, Any] = {
        "socket": SOCKET,
        "state_dir": "/var/lib/pylium",
        "bpffs_root": paths.bpffs_root,
        "orchestrator": "kubernetes",
        "pod_cidr": pod_cidr,
        "plugin_options": {"kubernetes": {
            "cni_conf_dir": "/host/etc/cni/net.d",
            "cni_socket": f"{paths.run.rstrip('/')}/{SOCKET.rsplit('/', 1)[1]}"}},
    }
    for name in plugins:
        kind, capability, _dist = PLUGINS[name]
        if kind == "l7_parsers":
            config.setdefault("l7_parsers", []).append(capability)
        else:
            config[kind] = capability
    if kvstore_endpoints:
        config["kvstore_options"] = {"endpoints": kvstore_endpoints.split(",")}
    return config


# CRDs ------------------------------------------------------------------------------------
_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {
                "key": {"type": "string"},
                "operator": {"type": "string",
                             "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                "values": {"type": "array", "items": {"type": "string"}},
            }}},
    },
}
_PEERS = {"type": "array", "items": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": True}}
_RULE = {
    "type": "object",
    "properties": {
        "endpointSelector": _SELECTOR,
        "nodeSelector": _SELECTOR,
        "ingress": _PEERS,
        "ingressDeny": _PEERS,
        "egress": _PEERS,
        "egressDeny": _PEERS,
        "labels": {"type": "array", "items": {
            "type": "object", "required": ["key"],
            "properties": {"key": {"type": "string"}, "value": {"type": "string"},
                           "source": {"type": "string"}}}},
        "description": {"type": "string"},
        "enableDefaultDeny": {"type": "object", "properties": {
            "ingress": {"type": "boolean"}, "egress": {"type": "boolean"}}},
    },
}
_STATUS = {
    "type": "object",
    "properties": {"nodes": {"type": "object", "additionalProperties": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "enforcing": {"type": "boolean"},
            "error": {"type": "string"},
            "lastUpdated": {"type": "string", "format": "date-time"},
            "localPolicyRevision": {"type": "integer", "format": "int64"},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        }}}},
}


def crd(kind: str, plural: str, scope: str, short_names: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["metadata"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "description": {"type": "string"},
            "spec": copy.deepcopy(_RULE),
            "specs": {"type": "array", "items": copy.deepcopy(_RULE)},
            "status": copy.deepcopy(_STATUS),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cilium.io"},
        "spec": {
            "group": "cilium.io",
            "scope": scope,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short_names,
                      "categories": ["cilium", "ciliumpolicy"]},
            "versions": [{
                "name": "v2", "served": True, "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": schema},
                "additionalPrinterColumns": [
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
            }],
        },
    }


def crds() -> list[dict[str, Any]]:
    return [crd("CiliumNetworkPolicy", "ciliumnetworkpolicies", "Namespaced",
                ["cnp", "ciliumnp"]),
            crd("CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", "Cluster",
                ["ccnp"])]


# RBAC ------------------------------------------------------------------------------------
def rbac() -> list[dict[str, Any]]:
    watch = ["get", "list", "watch"]
    rules = [
        {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services",
                                          "endpoints"], "verbs": watch},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": watch},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": watch},
        {"apiGroups": ["cilium.io"],
         "resources": ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
         "verbs": watch},
        {"apiGroups": ["cilium.io"],
         "resources": ["ciliumnetworkpolicies/status",
                       "ciliumclusterwidenetworkpolicies/status"],
         "verbs": ["patch", "update"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": NAME, "namespace": NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": NAME}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": NAME},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]},
    ]


# agent -----------------------------------------------------------------------------------
def configmap(config: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{NAME}-config", "namespace": NAMESPACE},
            "data": {"config.yaml": yaml.safe_dump(config, sort_keys=False)}}


def _host_path(name: str, path: str, kind: str = "DirectoryOrCreate") -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def daemonset(*, image: str, plugins: list[str], api_server: str = "",
              pull_policy: str = "IfNotPresent", paths: HostPaths = HostPaths()) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "PYLIUM_NODE_NAME",
         "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "PYLIUM_NODE_IP",
         "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "PYLIUM_CONFIG", "value": CONFIG_PATH},
        {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
    ]
    if api_server:
        # the API server's own address: there is no kube-proxy for the service IP before
        # pylium runs (Cilium's k8s-service-host does the same)
        host, _, port = api_server.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--api-server: {api_server!r} is not HOST:PORT")
        env += [{"name": "KUBERNETES_SERVICE_HOST", "value": host},
                {"name": "KUBERNETES_SERVICE_PORT", "value": port}]
    mounts = [
        # the node's bpffs itself (pins land there and outlive the pod); no propagation, so
        # the node's /sys/fs/bpf need not be a shared mount (Bidirectional would require it)
        {"name": "bpf-maps", "mountPath": "/sys/fs/bpf"},
        {"name": "run", "mountPath": "/var/run/pylium"},
        {"name": "state", "mountPath": "/var/lib/pylium"},
        {"name": "cni-conf", "mountPath": "/host/etc/cni/net.d"},
        {"name": "netns", "mountPath": "/var/run/netns", "mountPropagation": "HostToContainer"},
        # one file (subPath): the agent refuses a config in a world-writable directory, and
        # a ConfigMap volume's own directory is one
        {"name": "config", "mountPath": CONFIG_PATH, "subPath": "config.yaml",
         "readOnly": True},
    ]
    volumes = [
        _host_path("bpf-maps", "/sys/fs/bpf"),
        _host_path("run", paths.run),
        _host_path("state", paths.state),
        _host_path("cni-conf", paths.cni_conf),
        # the mount itself (shared), not through the /var/run link: HostToContainer needs it
        _host_path("netns", "/run/netns"),
        {"name": "config", "configMap": {"name": f"{NAME}-config"}},
        _host_path("cni-bin", paths.cni_bin),
    ]
    # Cilium's install-cni: the runtime execs CNI plugins on the host, so the plugin must be
    # there before the agent writes the conflist that names it
    install_cni = {
        "name": "install-cni",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["pylium", "k8s", "install-cni", "--bin-dir", CNI_BIN_MOUNT],
        "volumeMounts": [{"name": "cni-bin", "mountPath": CNI_BIN_MOUNT}],
    }
    probe_cmd = ["pylium", "-H", SOCKET, "k8s", "health"]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"k8s-app": NAME}},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": NAME}},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"k8s-app": NAME},
                             "annotations": {"pylium.io/plugins": ",".join(plugins)}},
                "spec": {
                    "hostNetwork": True,
                    # no cluster DNS, and the agent resolves no names: nothing leaves the node
                    "dnsPolicy": "None",
                    "dnsConfig": {"nameservers": ["127.0.0.1"]},
                    "serviceAccountName": NAME,
                    "priorityClassName": "system-node-critical",
                    "terminationGracePeriodSeconds": 10,
                    "tolerations": [{"operator": "Exists"}],
                    "initContainers": [install_cni],
                    "containers": [{
                        "name": "agent",
                        "image": image,
                        "imagePullPolicy": pull_policy,
                        "command": ["pylium", "agent", "--config", CONFIG_PATH],
                        "env": env,
                        "securityContext": {"privileged": True},
                        "readinessProbe": {"exec": {"command": probe_cmd},
                                           "initialDelaySeconds": 1, "periodSeconds": 2,
                                           "timeoutSeconds": 10, "failureThreshold": 3},
                        "livenessProbe": {"exec": {"command": probe_cmd},
                                          "initialDelaySeconds": 60, "periodSeconds": 10,
                                          "timeoutSeconds": 10, "failureThreshold": 10},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    }


def manifests(plugins: list[str], *, image: str = DEFAULT_IMAGE, pod_cidr: str = "10.200.0.0/24",
              api_server: str = "", pull_policy: str = "IfNotPresent",
              kvstore_endpoints: str = "", with_crds: bool = True,
              paths: HostPaths = HostPaths()) -> list[dict[str, Any]]:
    """Every object, in the order `kubectl apply` needs them."""
    docs = crds() if with_crds else []
    docs += rbac()
    docs.append(configmap(agent_config(plugins, pod_cidr=pod_cidr,
                                       kvstore_endpoints=kvstore_endpoints, paths=paths)))
    docs.append(daemonset(image=image, plugins=plugins, api_server=api_server,
                          pull_policy=pull_policy, paths=paths))
    return docs


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
