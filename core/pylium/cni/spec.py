"""The CNI protocol as the runtime speaks it (spec 1.0.0, the 1.1.0 verbs STATUS and GC, and
0.3.x/0.4.0 configs): environment variables, the network config on stdin, error objects and
result shapes. Pure functions, no agent and no kernel, so every rule here is unit-tested.

Well-known error codes are the spec's (section "Error"); 999 is the generic failure the
reference plugins (containernetworking/plugins) use for everything else."""

from __future__ import annotations

import json
import os
import re

from pylium.boundedjson import DocumentError, load_json

#: `typing` costs milliseconds at import and `pylium-cni` is exec'd for every pod: the
#: names below are for type checkers only (they treat any `TYPE_CHECKING` as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: versions whose configs and results this plugin understands, oldest first
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
VERBS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
FAILURE = 999

#: the environment each verb needs (spec section 2; STATUS and GC: 1.1.0)
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "VERSION": (),
    "STATUS": (),
    "GC": ("CNI_PATH",),
}

_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")
#: endpoint names the agent accepts (a DNS label, like Kubernetes pod names mostly are)
_ENDPOINT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class CNIError(Exception):
    """An error the plugin reports as a CNI error object on stdout (and exit 1)."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg,
                "details": self.details}


def version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def at_least(version: str, minimum: str) -> bool:
    return version_key(version) >= version_key(minimum)


# environment ------------------------------------------------------------------------------
def parse_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The verb and the variables it needs; CNIError 4 naming every missing or bad one."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
    if command not in VERBS:
        raise CNIError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}",
                       f"known: {', '.join(VERBS)}")
    missing = [name for name in REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT,
                       f"required env variables [{','.join(missing)}] missing")
    env: dict[str, Any] = {"command": command,
                           "container_id": environ.get("CNI_CONTAINERID", ""),
                           "netns": environ.get("CNI_NETNS", ""),
                           "ifname": environ.get("CNI_IFNAME", ""),
                           "path": environ.get("CNI_PATH", "")}
    if env["container_id"] and not _CONTAINER_ID.match(env["container_id"]):
        raise CNIError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not a valid container id",
                       f"{env['container_id']!r}: letters, digits, '_', '.' and '-' only")
    if env["ifname"] and (not _IFNAME.match(env["ifname"]) or env["ifname"] in (".", "..")):
        raise CNIError(INVALID_ENVIRONMENT, "CNI_IFNAME is not a valid interface name",
                       f"{env['ifname']!r}: 1-15 characters, no '/', ':' or spaces")
    if env["netns"] and not os.path.isabs(env["netns"]):
        raise CNIError(INVALID_ENVIRONMENT, "CNI_NETNS must be an absolute path",
                       repr(env["netns"]))
    env["args"] = parse_cni_args(environ.get("CNI_ARGS", ""))
    return env


def parse_cni_args(text: str) -> dict[str, str]:
    """`CNI_ARGS`: `K=V;K2=V2` (the kubelet passes K8S_POD_NAMESPACE, K8S_POD_NAME, ...)."""
    out: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENVIRONMENT, "CNI_ARGS is malformed",
                           f"{pair!r} is not KEY=VALUE")
        out[key] = value
    return out


# network config ---------------------------------------------------------------------------
def decode_config(raw: bytes) -> dict[str, Any]:
    """The network config on stdin: a JSON object (6 when it cannot be decoded)."""
    try:  # bounded (size, UTF-8, nesting): a hostile stdin is a decoding error, not a crash
        conf = load_json(bytes(raw), "network config")
    except DocumentError as exc:
        raise CNIError(DECODING_FAILURE, "error decoding network config", str(exc)) from None
    if not isinstance(conf, dict):
        raise CNIError(DECODING_FAILURE, "error decoding network config",
                       f"expected a JSON object, got {type(conf).__name__}")
    return conf


def config_version(conf: Mapping[str, Any]) -> str:
    """The config's cniVersion; 1 (incompatible) when it is not one this plugin speaks."""
    version = conf.get("cniVersion", "0.1.0")
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, "cniVersion must be a string", repr(version))
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    return version


def validate_config(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The settings pylium-cni reads: `socket` (the agent's API socket) and `dns`, plus
    the spec's `name`; 7 for a bad value, 2 for an `ipam` section (addresses come from the
    agent, not from an IPAM plugin)."""
    name = conf.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise CNIError(INVALID_CONFIG, "network config: name is missing or invalid",
                       f"name: {name!r}")
    socket = conf.get("socket", "")
    if not isinstance(socket, str) or (socket and not os.path.isabs(socket)):
        raise CNIError(INVALID_CONFIG, "network config: socket must be an absolute path",
                       f"socket: {socket!r}")
    dns = conf.get("dns", {})
    if not isinstance(dns, dict) or not all(
            isinstance(dns.get(k, []), list) for k in ("nameservers", "search", "options")):
        raise CNIError(INVALID_CONFIG, "network config: dns must be an object with lists",
                       f"dns: {dns!r}")
    ipam = conf.get("ipam")
    if ipam:
        raise CNIError(UNSUPPORTED_FIELD, "network config: unsupported field ipam",
                       f"ipam: {json.dumps(ipam)} (pylium-cni takes addresses from the "
                       "agent's IPAM)")
    return {"name": name, "socket": socket, "dns": dns}


def valid_attachments(conf: Mapping[str, Any]) -> list[dict[str, str]]:
    """GC's list of attachments to keep (`cni.dev/valid-attachments`, or the
    `cni.dev/attachments` spelling libcni also sends). Missing is an error: GC with an
    empty list would delete every pod's network."""
    value = conf.get("cni.dev/valid-attachments", conf.get("cni.dev/attachments"))
    if value is None:
        raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    if not isinstance(value, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str)
            and isinstance(a.get("ifname", ""), str) for a in value):
        raise CNIError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list of "
                       "{containerID, ifname} objects")
    return [{"container_id": a["containerID"], "ifname": a.get("ifname") or "eth0"}
            for a in value]


# the endpoint a container gets ------------------------------------------------------------
def endpoint_identity(env: Mapping[str, Any]) -> tuple[str, str]:
    """(name, namespace) of the container's endpoint: the pod's, when the runtime says
    (the kubelet's K8S_POD_NAME/K8S_POD_NAMESPACE), else one derived from the container
    id in namespace `default`."""
    args = env.get("args", {})
    name, namespace = args.get("K8S_POD_NAME", ""), args.get("K8S_POD_NAMESPACE", "")
    if _ENDPOINT_NAME.match(name) and _ENDPOINT_NAME.match(namespace):
        return name, namespace
    return name_from_container_id(env["container_id"]), namespace if \
        _ENDPOINT_NAME.match(namespace) else "default"


def name_from_container_id(container_id: str) -> str:
    text = re.sub(r"[^a-z0-9.-]", "-", container_id.lower())[:63].strip("-.")
    return text or "container"


# results ----------------------------------------------------------------------------------
def add_result(version: str, endpoint: Mapping[str, Any], netns: str,
               dns: Mapping[str, Any]) -> dict[str, Any]:
    """The ADD result for an endpoint as the agent describes it, in `version`'s shape:
    the host-side veth and the pod's interface (with its sandbox), the pod's /32 with the
    gateway, the default route (via that gateway), and the config's DNS. 0.3.x/0.4.0 carry `ips[].version`."""
    gateway = endpoint["gateway"]
    ip = {"address": f"{endpoint['ipv4']}/32", "gateway": gateway, "interface": 1}
    if not at_least(version, "1.0.0"):
        ip = {"version": "4", **ip}
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [{"name": endpoint["ifname"], "mac": endpoint["mac"]},
                       {"name": endpoint["pod_ifname"], "mac": endpoint["pod_mac"],
                        "sandbox": netns}],
        "ips": [ip],
        # no `gw`: the spec says the route then goes via the ips' gateway (as bridge does)
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    result["dns"] = {k: v for k, v in dns.items() if v} if dns else {}
    return result


def check_against(prev: Any, endpoint: Mapping[str, Any], env: Mapping[str, Any]) -> list[str]:
    """What in `prevResult` (the ADD's result, handed back on CHECK) disagrees with the
    endpoint the agent has."""
    if not isinstance(prev, dict):
        return ["prevResult is missing or not an object"]
    problems = []
    interfaces = prev.get("interfaces") or []
    pod = [i for i in interfaces if isinstance(i, dict) and i.get("name") == env["ifname"]
           and i.get("sandbox")]
    if not pod:
        problems.append(f"prevResult has no interface {env['ifname']} in a sandbox")
    else:
        if pod[0].get("mac") and pod[0]["mac"].lower() != endpoint["pod_mac"].lower():
            problems.append(f"{env['ifname']} has MAC {endpoint['pod_mac']}, prevResult says "
                            f"{pod[0]['mac']}")
        if pod[0]["sandbox"] != env["netns"]:
            problems.append(f"prevResult's sandbox {pod[0]['sandbox']} is not CNI_NETNS "
                            f"{env['netns']}")
    addresses = {ip.get("address", "").split("/")[0] for ip in prev.get("ips") or []
                 if isinstance(ip, dict)}
    if endpoint["ipv4"] not in addresses:
        problems.append(f"the endpoint's address {endpoint['ipv4']} is not in prevResult "
                        f"(it has {sorted(addresses)})")
    return problems
