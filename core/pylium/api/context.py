"""What a capability backend may touch: one frozen context type per capability kind.

The core builds the context of the selected capability's kind, hands it to the backend's
`from_context()` and keeps everything else to itself. A third-party plugin reads this module
to know its whole world: nothing outside the context is part of the contract.

Handles are typed by the small protocols below, not by the core's classes, so a backend
depends on what it uses (and a test can hand it something else that behaves the same)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from pylium.api.node import NodeInfo


class PluginBpf(Protocol):
    """The programs and maps the core compiled and loaded from the record's `bpf_sources`
    (with its `defines`). Maps named like the core's pinned maps (endpoints, ipcache, policy,
    conntrack, ...) are the core's own: the plugin's programs share them."""

    def program(self, name: str) -> int:
        """File descriptor of a program, by its C function name."""

    def map(self, name: str) -> int:
        """File descriptor of a map, by its C name."""


class FlowRecorder(Protocol):
    """The flow layer, as proxies use it: an L7 event becomes a Hubble-style flow."""

    def record_l7(self, *, src_ip: str, dst_ip: str, sport: int, dport: int,
                  src_identity: int, dst_identity: int, verdict: str, l7: dict[str, Any],
                  ep_id: int = 0, direction: int = 0, is_reply: bool = False,
                  protocol: int = 6, proxy_port: int = 0) -> Any: ...


class IdentityLookup(Protocol):
    """Numeric security identities and their labels (local and cluster-wide)."""

    def labels_of(self, identity: int) -> tuple[str, ...]:
        """`k8s:app=web`-style labels of an identity; () if unknown."""

    def identity_of_ip(self, address: str) -> int:
        """The identity an IPv4 address has (endpoint, remote pod, CIDR, or world=2)."""


@attrs.frozen(kw_only=True)
class CapabilityContext:
    """What every backend gets: its selected name, this node, its options
    (`plugin_options.<name>` in the agent config), a state directory of its own (kept across
    agent restarts), a logger, and the BPF the core loaded from its record."""

    node: NodeInfo
    name: str = ""
    options: Mapping[str, Any] = attrs.field(factory=dict)
    #: None only where a test builds a context by hand
    state_dir: Path | None = None
    log: logging.Logger = attrs.field(factory=lambda: logging.getLogger("pylium.plugin"))
    #: loaded from the record's `bpf_sources` before the backend is built; None when the
    #: record has no sources or declares `runtime_defines` (then call `load_bpf`)
    bpf: PluginBpf | None = None
    #: for records with `runtime_defines`: `load_bpf(NAME=value, ...)` compiles and loads the
    #: record's sources with those defines added (each declared one exactly once); the core
    #: owns the result and closes it when the capability stops
    load_bpf: Callable[..., PluginBpf] | None = None
    #: a `prometheus_client.CollectorRegistry` the agent serves on its metrics endpoint
    metrics: Any = None


@attrs.frozen(kw_only=True)
class KVStoreContext(CapabilityContext):
    """A KV store is opened first: it gets nothing but its options and state directory."""


@attrs.frozen(kw_only=True)
class NodeDatapathContext(CapabilityContext):
    """For capabilities that shape how this node's traffic leaves it (routing, encryption):
    the endpoint datapath (`set_routing_slot`, ipcache, ...; None in unit tests without
    BPF), the underlay link (the one holding the node IP) and its MTU."""

    datapath: Any = None
    underlay_ifname: str = ""
    underlay_mtu: int = 1500


@attrs.frozen(kw_only=True)
class RoutingContext(NodeDatapathContext):
    """A routing mode programs how remote pod CIDRs are reached."""


@attrs.frozen(kw_only=True)
class EncryptionContext(NodeDatapathContext):
    """Encryption also knows the selected routing mode (tunnel inside or instead) and
    whether the agent config opens the plaintext gap to nodes without a published key
    (`encryption_allow_plaintext`)."""

    routing_mode: str = "local"
    allow_plaintext: bool = False


@attrs.frozen(kw_only=True)
class L7Context(CapabilityContext):
    """An L7 parser runs a proxy: it is told which ports the datapath redirects its
    protocol to (`proxy_ports`: direction "ingress"/"egress" -> port), reads the L7 policy
    of local endpoints (`policy`: `snapshot()` and `subscribe(callback)`), resolves
    identities, and reports every request and response to the flow layer."""

    datapath: Any = None
    proxy_ports: Mapping[str, int] = attrs.field(factory=dict)
    policy: Any = None
    identities: IdentityLookup | None = None
    flows: FlowRecorder | None = None


@attrs.frozen(kw_only=True)
class OrchestratorContext(CapabilityContext):
    """An orchestrator feeds the agent: endpoints (`endpoints`: the endpoint manager),
    policies (`policy`: the policy store), identities, the KV store, load-balanced
    services (`services`: `await upsert(pylium.lb.model.Service)`, `await delete(name)`,
    `list()` — what `PUT/DELETE /v1/service` do) and nodes (`nodes`: the node registry,
    `set_external(source, NodeInfo, **extra)`, `remove_external(source, name)`,
    `external(source)`). `services` and `nodes` are None when the agent runs without the
    lb or cluster component (no KV store)."""

    endpoints: Any = None
    policy: Any = None
    identities: Any = None
    kvstore: Any = None
    services: Any = None
    nodes: Any = None
