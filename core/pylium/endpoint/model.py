"""The endpoint record: what the agent knows about one pod, persisted as JSON."""

from __future__ import annotations

import hashlib
import re
import sys
import time
import weakref
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs

from pylium.errors import UserError

#: Cilium's endpoint id range (0 is "no endpoint", 4095 the highest an id may take)
MIN_ENDPOINT_ID = 1
MAX_ENDPOINT_ID = 4095
LABEL_SOURCE = "k8s"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"

#: endpoint states, after Cilium's (`cilium endpoint list` STATUS column)
READY = "ready"
NOT_READY = "not-ready"
WAITING_FOR_IDENTITY = "waiting-for-identity"
REGENERATING = "regenerating"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,61}[a-zA-Z0-9])?$")
_LABEL_VALUE = re.compile(r"^([a-zA-Z0-9]([-a-zA-Z0-9_.]{0,61}[a-zA-Z0-9])?)?$")


class _SharedLabels(dict):
    """A label mapping that endpoints with the same labels share (never mutated)."""

    __slots__ = ("__weakref__",)


#: label items → the one mapping every endpoint with those labels holds: the pods of a
#: deployment carry the same labels, so a node keeps one copy per label set, not per pod
_LABEL_SETS: weakref.WeakValueDictionary[tuple[tuple[str, str], ...], _SharedLabels] = \
    weakref.WeakValueDictionary()


def shared_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The shared mapping equal to `labels` (keys and values interned)."""
    items = tuple((sys.intern(k), sys.intern(v)) for k, v in labels.items())
    found = _LABEL_SETS.get(items)
    if found is None:
        found = _LABEL_SETS.setdefault(items, _SharedLabels(items))
    return found


def _intern(value: str) -> str:
    return sys.intern(value) if type(value) is str else value


@attrs.frozen(kw_only=True)
class Endpoint:
    id: int
    name: str
    namespace: str = attrs.field(converter=_intern)
    #: the pod's own labels, without source prefix ({"org": "empire"}); endpoints with the
    #: same labels share one mapping (`shared_labels`): never change it in place
    labels: dict[str, str] = attrs.field(converter=shared_labels)
    #: netns name (under /run/netns) or absolute path of the pod's network namespace
    netns: str
    ipv4: str
    #: host-side veth (in the node namespace) and the pod side's MAC
    ifname: str
    ifindex: int
    mac: str
    pod_mac: str
    #: the runtime's container id when a CNI ADD made the endpoint ("" for the lab's API
    #: calls), and the pod-side interface name (CNI_IFNAME)
    container_id: str = ""
    pod_ifname: str = attrs.field(default="eth0", converter=_intern)
    identity: int = 0
    state: str = WAITING_FOR_IDENTITY
    #: why the endpoint is not ready, "" when it is
    error: str = ""
    ingress_enforced: bool = False
    egress_enforced: bool = False
    policy_revision: int = 0
    created_at: float = attrs.field(factory=time.time)

    @property
    def ipam_owner(self) -> str:
        """Who holds the endpoint's address in IPAM: the container (CNI) or namespace/name."""
        if self.container_id:
            return container_owner(self.container_id)
        return f"endpoint:{self.namespace}/{self.name}"

    @property
    def identity_labels(self) -> dict[str, str]:
        return identity_labels(self.namespace, self.labels)

    def to_api(self) -> dict[str, Any]:
        data = CONVERTER.unstructure(self)
        data["identity_labels"] = [f"{k}={v}" for k, v in self.identity_labels.items()]
        return data


CONVERTER = cattrs.Converter(forbid_extra_keys=True)


def identity_labels(namespace: str, labels: Mapping[str, str]) -> dict[str, str]:
    """Labels with their source, as identities and selectors see them (Cilium's pod
    labels plus the namespace label)."""
    out = {f"{LABEL_SOURCE}:{k}": v for k, v in sorted(labels.items())}
    out[f"{LABEL_SOURCE}:{NAMESPACE_LABEL}"] = namespace
    return dict(sorted(out.items()))


def endpoint_from_json(data: dict[str, Any]) -> Endpoint:
    return CONVERTER.structure(data, Endpoint)


def endpoint_to_json(endpoint: Endpoint) -> dict[str, Any]:
    return CONVERTER.unstructure(endpoint)


def host_ifname(namespace: str, name: str, container_id: str = "") -> str:
    """`lxc` + 11 hex digits of a hash (15 chars, Linux's limit) of the container id, as
    Cilium names the host side, or of namespace/name for endpoints without one."""
    key = container_id or f"{namespace}/{name}"
    return "lxc" + hashlib.sha256(key.encode()).hexdigest()[:11]


def container_owner(container_id: str) -> str:
    """The IPAM owner string of a CNI container's address."""
    return f"container:{container_id}"


#: what CNI_CONTAINERID and CNI_IFNAME may hold (the spec: "alphanumeric, '_', '.', '-'",
#: a Linux interface name: at most 15 bytes, no '/', ':' or whitespace)
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")


def validate_container_id(value: Any) -> str:
    if not isinstance(value, str) or not _CONTAINER_ID.match(value):
        raise UserError(f"container_id: {value!r} is not a valid container id (letters, "
                        "digits, '_', '.' and '-', starting with a letter or digit)")
    return value


def validate_ifname(value: Any) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value) or value in (".", ".."):
        raise UserError(f"ifname: {value!r} is not a valid interface name (1-15 characters, "
                        "no '/', ':' or spaces)")
    return value


def validate_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise UserError(f"{field}: {value!r} is not a valid name (lowercase letters, digits, "
                        "'-' and '.', at most 63 characters)")
    return value


def validate_labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError("labels: expected a mapping of label key to value")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise UserError(f"labels: {key!r} is not a valid label key")
        if key.startswith(f"{LABEL_SOURCE}:") or key == NAMESPACE_LABEL:
            raise UserError(f"labels: {key!r} is set by pylium; give the pod's own labels")
        if not isinstance(val, str) or not _LABEL_VALUE.match(val):
            raise UserError(f"labels.{key}: {val!r} is not a valid label value")
        out[key] = val
    return dict(sorted(out.items()))
