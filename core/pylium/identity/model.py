"""Numeric security identities: Cilium's reserved numbers, allocated ids from 256, and local
CIDR identities in the 1<<24 range."""

from __future__ import annotations

import ipaddress

import attrs

from pylium.identity.labels import SOURCE_CIDR, SOURCE_RESERVED, Label, LabelSet

IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_HEALTH = 4
IDENTITY_INIT = 5
IDENTITY_REMOTE_NODE = 6
IDENTITY_KUBE_APISERVER = 7
IDENTITY_INGRESS = 8

#: Cilium's reserved identities and the reserved label each carries
RESERVED_NAMES: dict[int, str] = {
    IDENTITY_HOST: "host",
    IDENTITY_WORLD: "world",
    IDENTITY_UNMANAGED: "unmanaged",
    IDENTITY_HEALTH: "health",
    IDENTITY_INIT: "init",
    IDENTITY_REMOTE_NODE: "remote-node",
    IDENTITY_KUBE_APISERVER: "kube-apiserver",
    IDENTITY_INGRESS: "ingress",
}
RESERVED_BY_NAME = {name: num for num, name in RESERVED_NAMES.items()}

#: first identity handed out for label sets (cluster scope, agreed through the KV store)
MIN_ALLOCATED = 256
MAX_ALLOCATED = (1 << 16) - 1
#: CIDR identities are node-local and live in the 1<<24 range (Cilium's local scope)
LOCAL_SCOPE = 1 << 24
MAX_LOCAL = (1 << 25) - 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def reserved_labels(number: int) -> LabelSet:
    return LabelSet([Label(SOURCE_RESERVED, RESERVED_NAMES[number])])


def cidr_labels(prefix: Network) -> LabelSet:
    """A CIDR identity carries its prefix and `reserved:world` (it is outside the cluster)."""
    return LabelSet([Label(SOURCE_CIDR, str(prefix)), Label(SOURCE_RESERVED, "world")])


@attrs.frozen
class Identity:
    id: int
    labels: LabelSet = attrs.field(converter=LabelSet, eq=False)
    #: the prefix of a CIDR identity, None otherwise
    cidr: Network | None = attrs.field(default=None, eq=False)

    @property
    def reserved(self) -> bool:
        return self.id in RESERVED_NAMES

    @property
    def is_cidr(self) -> bool:
        return self.cidr is not None

    @property
    def is_world(self) -> bool:
        """World or a CIDR identity: traffic from outside the cluster."""
        return self.id == IDENTITY_WORLD or self.cidr is not None

    def to_dict(self) -> dict:
        return {"id": self.id, "labels": self.labels.sorted_strings()}


RESERVED_IDENTITIES: dict[int, Identity] = {
    num: Identity(num, reserved_labels(num)) for num in RESERVED_NAMES
}
