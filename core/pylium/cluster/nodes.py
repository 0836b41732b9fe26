"""The node registry: this node's `NodeInfo` under `pylium/state/nodes/v1/<name>` (on the
cluster lease), every other node followed through a `PrefixMirror`.

A node appears → `on_joined(node)`; its record changes → `on_joined(new)` again (an
update); its key goes (deregistered, or its lease expired because the agent died) →
`on_left(node)`. Cilium's `cilium node list` reads the same view.

An orchestrator feeds nodes it knows too (Kubernetes Node objects: `set_external` /
`remove_external`), through the same callbacks. A node known from several sources is taken
from the strongest (Cilium's node sources): this agent's own config, then an agent's record
in the KV store (it carries the encryption key and routing mode), then the orchestrator's."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs

from pylium.api import NodeInfo
from pylium.api.kvstore import KVStore, Lease
from pylium.cluster.mirror import PrefixMirror
from pylium.cluster.session import ClusterSession
from pylium.documents import RecordError, load_record

log = logging.getLogger(__name__)

NODES_PREFIX = "pylium/state/nodes/v1/"
KVSTORE_SOURCE = "kvstore"

NodeCallback = Callable[[NodeInfo], None]


def node_key(name: str) -> str:
    return NODES_PREFIX + name


def encode_node(node: NodeInfo, **extra: Any) -> bytes:
    return json.dumps({"name": node.name, "ipv4": str(node.ipv4),
                       "pod_cidr": str(node.pod_cidr), "labels": dict(node.labels),
                       "encryption_key": node.encryption_key, **extra},
                      sort_keys=True).encode()


def decode_node(raw: bytes) -> tuple[NodeInfo, dict[str, Any]]:
    """(NodeInfo, the record's other fields); `RecordError` when the record is not one."""
    data = load_record(raw, "node record")
    if not isinstance(data, dict):
        raise RecordError("node record: expected a JSON object")
    name, labels = data.pop("name", None), data.pop("labels", None) or {}
    key = data.pop("encryption_key", None) or ""
    if not isinstance(name, str) or not name:
        raise RecordError("node record: name: expected a non-empty string")
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise RecordError("node record: labels: expected a mapping of strings")
    if not isinstance(key, str):
        raise RecordError("node record: encryption_key: expected a string")
    try:
        node = NodeInfo(name=name, ipv4=_address(str(data.pop("ipv4"))),
                        pod_cidr=_network(str(data.pop("pod_cidr"))), labels=labels,
                        encryption_key=key)
    except KeyError as exc:
        raise RecordError(f"node record: {exc.args[0]}: required field missing") from None
    except ValueError as exc:
        raise RecordError(f"node record: {exc}") from None
    return node, data


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED = re.compile(_OCTET + r"(?:\." + _OCTET + r"){3}").fullmatch
_CIDR = re.compile(r"(" + _OCTET + r"(?:\." + _OCTET + r"){3})/(3[0-2]|[12]?[0-9])").fullmatch


def _address(text: str) -> int | str:
    """A plain dotted quad as the number `IPv4Address` takes without parsing text again
    (every node decodes every node's record at join: N² of them); anything else as given,
    for `IPv4Address` to accept or refuse as always."""
    if _DOTTED(text) is None:
        return text
    return int.from_bytes(socket.inet_aton(text), "big")


def _network(text: str) -> tuple[int, int] | str:
    """`ADDRESS/LENGTH` as the (number, length) `IPv4Network` takes (host bits set are
    still refused, by `IPv4Network` itself); anything else as given."""
    match = _CIDR(text)
    if match is None:
        return text
    return int.from_bytes(socket.inet_aton(match[1]), "big"), int(match[2])


class NodeRegistry:
    def __init__(self, kvstore: KVStore, session: ClusterSession, local: NodeInfo,
                 on_joined: NodeCallback | None = None, on_left: NodeCallback | None = None,
                 extra: dict[str, Any] | None = None):
        self.kvstore = kvstore
        self.session = session
        self.local = local
        self.extra = {"registered_at": round(time.time(), 3), **(extra or {})}
        self._joined = [on_joined] if on_joined else []
        self._left = [on_left] if on_left else []
        #: other nodes by name, each from its strongest source
        self.nodes: dict[str, NodeInfo] = {}
        self.records: dict[str, dict[str, Any]] = {}
        #: source -> name -> (node, the record's other fields); "kvstore" first, then the
        #: orchestrators' sources in the order they first fed a node
        self._sources: dict[str, dict[str, tuple[NodeInfo, dict[str, Any]]]] = {
            KVSTORE_SOURCE: {}}
        self.mirror = PrefixMirror(kvstore, NODES_PREFIX, self._changed,
                                   reset_grace=session.reset_grace)
        session.on_new_lease(self.publish)
        session.on_resync(self.resync)
        session.on_wipe_noticed(self.mirror.store_wiped)
        session.size_from(lambda: len(self.nodes) + 1)

    def subscribe(self, on_joined: NodeCallback | None = None,
                  on_left: NodeCallback | None = None) -> None:
        if on_joined:
            self._joined.append(on_joined)
        if on_left:
            self._left.append(on_left)

    async def start(self) -> None:
        await self.publish(self.session.lease)
        self.mirror.start()
        await self.mirror.synced.wait()

    async def publish(self, lease: Lease | None = None) -> None:
        await self.kvstore.put(node_key(self.local.name),
                               encode_node(self.local, **self.extra),
                               lease=lease or self.session.lease)

    async def resync(self) -> None:
        if await self.kvstore.get(node_key(self.local.name)) is None:
            await self.publish()
        await self.mirror.resync()

    def _changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        name = key[len(NODES_PREFIX):]
        if name == self.local.name:
            return
        if new is None:
            self._sources[KVSTORE_SOURCE].pop(name, None)
            self._update(name)
            return
        try:
            node, extra = decode_node(new)
        except RecordError as exc:
            log.warning("ignoring unreadable node record %s: %s", key, exc)
            return
        if node.name != name:
            log.warning("ignoring node record %s: it names node %r", key, node.name)
            return
        self._sources[KVSTORE_SOURCE][name] = (node, extra)
        self._update(name)

    # nodes from an orchestrator ----------------------------------------------------------
    def set_external(self, source: str, node: NodeInfo, **extra: Any) -> None:
        """`node` as `source` (e.g. "kubernetes") knows it: joins (or updates) through the
        same callbacks as a node from the KV store, unless a stronger source has it. The
        local node's entry only adds to `list()` (its labels, the source)."""
        if source in ("local", KVSTORE_SOURCE):
            raise ValueError(f"node source {source!r} is the registry's own")
        self._sources.setdefault(source, {})[node.name] = (node, dict(extra))
        self._update(node.name)

    def remove_external(self, source: str, name: str) -> None:
        """`source` no longer knows node `name` (the node leaves unless another source
        still has it)."""
        if self._sources.get(source, {}).pop(name, None) is not None:
            self._update(name)

    def external(self, source: str) -> dict[str, NodeInfo]:
        """The nodes `source` fed, by name."""
        return {name: node for name, (node, _) in self._sources.get(source, {}).items()}

    def sources_of(self, name: str) -> list[str]:
        """Where node `name` is known from, strongest first."""
        found = ["local"] if name == self.local.name else []
        return found + [source for source, nodes in self._sources.items() if name in nodes]

    def _update(self, name: str) -> None:
        """Make `nodes[name]` the strongest source's view and tell the callbacks."""
        if name == self.local.name:
            return
        found = next((nodes[name] for nodes in self._sources.values() if name in nodes), None)
        previous = self.nodes.get(name)
        if found is None:
            self.records.pop(name, None)
            if self.nodes.pop(name, None) is not None:
                log.info("node %s (%s) left", name, previous.ipv4)
                for callback in list(self._left):
                    _safe(callback, previous, "left")
            return
        node, extra = found
        self.nodes[name] = node
        self.records[name] = extra
        if previous == node:
            return
        if log.isEnabledFor(logging.INFO):  # every node hears of every node at join
            log.info("node %s %s (%s, pod CIDR %s; from %s)", name,
                     "updated" if previous else "joined", node.ipv4, node.pod_cidr,
                     self.sources_of(name)[0])
        for callback in list(self._joined):
            _safe(callback, node, "joined")

    def node_ip(self, name: str) -> str | None:
        if name == self.local.name:
            return str(self.local.ipv4)
        node = self.nodes.get(name)
        return str(node.ipv4) if node is not None else None

    def list(self) -> list[dict[str, Any]]:
        """Every node this agent knows, itself included, sorted by name."""
        local = self.local
        labels = {}
        for nodes in reversed(list(self._sources.values())):  # the strongest last
            if local.name in nodes:
                labels.update(nodes[local.name][0].labels)
        if labels:
            local = attrs.evolve(local, labels={**labels, **local.labels})
        rows = [_row(local, {**self.extra}, local=True, sources=self.sources_of(local.name))]
        rows += [_row(node, self.records.get(name, {}), local=False,
                      sources=self.sources_of(name))
                 for name, node in self.nodes.items()]
        return sorted(rows, key=lambda r: r["name"])

    async def close(self, deregister: bool = False) -> None:
        await self.mirror.close()
        if deregister:
            await self.kvstore.delete(node_key(self.local.name))


def _row(node: NodeInfo, extra: dict[str, Any], local: bool,
         sources: list[str]) -> dict[str, Any]:
    return {"name": node.name, "ipv4": str(node.ipv4), "pod_cidr": str(node.pod_cidr),
            "labels": dict(node.labels), "encryption_key": node.encryption_key,
            "local": local, "sources": sources,
            **{k: v for k, v in extra.items() if k not in ("local", "sources")}}


def _safe(callback: NodeCallback, node: NodeInfo, what: str) -> None:
    try:
        callback(node)
    except Exception:
        log.exception("node %s callback for %s failed", what, node.name)
